//! The MLIR/LLVM 22 side of the backend (feature `mlir`): parse the emitted text with melior,
//! load the `loop` dialect from IRDL, verify, run the lowering pipeline to the `llvm` dialect,
//! translate to LLVM IR and compile it in process with LLVM's target machine for the host
//! (`-O3`, host CPU and features: AVX-512 where the host has it) into an object that is linked
//! with `cc -shared` like the Cranelift backend's.
//!
//! The LLVM-C functions for the target machine are not in `mlir-sys`'s bindings, but the static
//! LLVM libraries `mlir-sys` links carry them, so they are declared here.

use super::{kernels_module, MlirError, LOOP_DIALECT_IRDL, LOWERING_PIPELINE};
use crate::backend::cranelift::BackendError;
use loopc_runtime::artifact::KernelDecl;
use melior::dialect::DialectRegistry;
use melior::ir::operation::OperationLike;
use melior::ir::Module;
use melior::pass::PassManager;
use melior::utility::{
    load_irdl_dialects, parse_pass_pipeline, register_all_dialects, register_all_llvm_translations,
    register_all_passes,
};
use melior::Context;
use mlir_sys::{
    mlirTranslateModuleToLLVMIR, LLVMContextCreate, LLVMContextDispose, LLVMDisposeMessage,
    LLVMDisposeModule, LLVMModuleRef,
};
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::rc::Rc;
use std::sync::Once;

/// Output of [`compile_kernels`].
#[derive(Debug, Clone)]
pub struct MlirKernels {
    pub object: Vec<u8>,
    pub shared_object: Vec<u8>,
    /// The `llvm`-dialect module after the lowering pipeline (`--stage llvm`).
    pub llvm_dialect: String,
    /// Whether the object has the AMX bf16 GEMM (the host's LLVM target has AMX-BF16).
    pub amx: bool,
}

/// Whether LLVM's view of this host includes AMX tiles with bf16 (what the AMX GEMM's
/// intrinsics need to be selected).
pub fn host_has_amx() -> bool {
    // SAFETY: LLVM returns an owned C string, freed by `take_message`.
    let f = unsafe { take_message(LLVMGetHostCPUFeatures()) };
    f.split(',').any(|x| x == "+amx-bf16") && f.split(',').any(|x| x == "+amx-tile")
}

/// An MLIR context with every upstream dialect, pass and LLVM translation registered, plus the
/// `loop` dialect, and the diagnostics it reports collected for error messages.
pub struct Mlir {
    pub context: Context,
    diagnostics: Rc<RefCell<Vec<String>>>,
}

fn err(message: String) -> MlirError {
    MlirError::Mlir(message)
}

impl Mlir {
    pub fn new() -> Result<Mlir, MlirError> {
        let registry = DialectRegistry::new();
        register_all_dialects(&registry);
        register_all_passes();
        // Each compile is one small module; MLIR's thread pool would only compete with the
        // runtime's and the test harness's threads.
        let context = Context::new_with_registry(&registry, false);
        context.load_all_available_dialects();
        register_all_llvm_translations(&context);
        let diagnostics = Rc::new(RefCell::new(vec![]));
        let sink = diagnostics.clone();
        context.attach_diagnostic_handler(move |d| {
            let mut s = format!("{}: {d}", d.location());
            for k in 0..d.note_count() {
                if let Ok(n) = d.note(k) {
                    s.push_str(&format!("\n  note: {n}"));
                }
            }
            sink.borrow_mut().push(s);
            true
        });
        let mlir = Mlir {
            context,
            diagnostics,
        };
        // The loaded dialect keeps its own copy of the constraints: the IRDL module may go.
        let loaded = {
            let dialect = mlir.parse(LOOP_DIALECT_IRDL, "the loop dialect (IRDL)")?;
            load_irdl_dialects(&dialect)
        };
        if !loaded {
            return Err(err(format!(
                "cannot load the loop dialect:\n{}",
                mlir.take_diagnostics()
            )));
        }
        Ok(mlir)
    }

    fn take_diagnostics(&self) -> String {
        std::mem::take(&mut *self.diagnostics.borrow_mut()).join("\n")
    }

    /// Parse and verify.
    pub fn parse<'c>(&'c self, text: &str, what: &str) -> Result<Module<'c>, MlirError> {
        let module = Module::parse(&self.context, text).ok_or_else(|| {
            err(format!(
                "{what} does not parse:\n{}",
                self.take_diagnostics()
            ))
        })?;
        if !module.as_operation().verify() {
            return Err(err(format!(
                "{what} fails MLIR's verifier:\n{}",
                self.take_diagnostics()
            )));
        }
        Ok(module)
    }

    /// Run [`LOWERING_PIPELINE`]: afterwards the module is in the `llvm` dialect only.
    pub fn lower(&self, module: &mut Module) -> Result<(), MlirError> {
        let pm = PassManager::new(&self.context);
        parse_pass_pipeline(pm.as_operation_pass_manager(), LOWERING_PIPELINE)
            .map_err(|e| err(format!("bad pass pipeline: {e}")))?;
        pm.run(module).map_err(|e| {
            err(format!(
                "lowering to the llvm dialect failed: {e}\n{}",
                self.take_diagnostics()
            ))
        })
    }
}

/// Parse and verify a module text (e.g. `--stage mlir` output); returns MLIR's diagnostics on
/// failure.
pub fn verify(text: &str) -> Result<(), MlirError> {
    let mlir = Mlir::new()?;
    mlir.parse(text, "the module").map(|_| ())
}

/// The `llvm`-dialect module of a module text after the lowering pipeline.
pub fn lower_text(text: &str) -> Result<String, MlirError> {
    let mlir = Mlir::new()?;
    let mut module = mlir.parse(text, "the module")?;
    mlir.lower(&mut module)?;
    Ok(module.as_operation().to_string())
}

/// Compile every kernel through MLIR and LLVM into a shared object with the same symbols and
/// ABI as the Cranelift backend's.
pub fn compile_kernels(kernels: &[KernelDecl]) -> Result<MlirKernels, MlirError> {
    let amx = host_has_amx();
    let text = kernels_module(kernels, amx)?;
    let mlir = Mlir::new()?;
    let mut module = mlir.parse(&text, "the kernel module")?;
    mlir.lower(&mut module)?;
    let llvm_dialect = module.as_operation().to_string();
    let object = unsafe { emit_object(&module)? };
    let shared_object = super::super::cranelift::link::shared_object(&object)?;
    Ok(MlirKernels {
        object,
        shared_object,
        llvm_dialect,
        amx,
    })
}

// ---------------------------------------------------------------------------------------------
// LLVM-C: target machine and object emission.

#[allow(non_snake_case)]
unsafe extern "C" {
    fn LLVMInitializeX86TargetInfo();
    fn LLVMInitializeX86Target();
    fn LLVMInitializeX86TargetMC();
    fn LLVMInitializeX86AsmPrinter();
    fn LLVMGetDefaultTargetTriple() -> *mut c_char;
    fn LLVMGetHostCPUName() -> *mut c_char;
    fn LLVMGetHostCPUFeatures() -> *mut c_char;
    fn LLVMGetTargetFromTriple(
        triple: *const c_char,
        target: *mut *mut c_void,
        error: *mut *mut c_char,
    ) -> i32;
    fn LLVMCreateTargetMachine(
        target: *mut c_void,
        triple: *const c_char,
        cpu: *const c_char,
        features: *const c_char,
        level: u32,
        reloc: u32,
        code_model: u32,
    ) -> *mut c_void;
    fn LLVMDisposeTargetMachine(tm: *mut c_void);
    fn LLVMCreateTargetDataLayout(tm: *mut c_void) -> *mut c_void;
    fn LLVMDisposeTargetData(td: *mut c_void);
    fn LLVMSetModuleDataLayout(m: LLVMModuleRef, dl: *mut c_void);
    fn LLVMSetTarget(m: LLVMModuleRef, triple: *const c_char);
    fn LLVMCreatePassBuilderOptions() -> *mut c_void;
    fn LLVMDisposePassBuilderOptions(o: *mut c_void);
    fn LLVMRunPasses(
        m: LLVMModuleRef,
        passes: *const c_char,
        tm: *mut c_void,
        options: *mut c_void,
    ) -> *mut c_void;
    fn LLVMGetErrorMessage(e: *mut c_void) -> *mut c_char;
    fn LLVMDisposeErrorMessage(m: *mut c_char);
    fn LLVMTargetMachineEmitToMemoryBuffer(
        tm: *mut c_void,
        m: LLVMModuleRef,
        kind: u32,
        error: *mut *mut c_char,
        out: *mut *mut c_void,
    ) -> i32;
    fn LLVMGetBufferStart(b: *mut c_void) -> *const c_char;
    fn LLVMGetBufferSize(b: *mut c_void) -> usize;
    fn LLVMDisposeMemoryBuffer(b: *mut c_void);
}

const CODEGEN_AGGRESSIVE: u32 = 3;
const RELOC_PIC: u32 = 2;
const CODE_MODEL_DEFAULT: u32 = 0;
const OBJECT_FILE: u32 = 1;

unsafe fn take_message(p: *mut c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    unsafe { LLVMDisposeMessage(p) };
    s
}

/// Owns the LLVM objects of one compile, disposed in reverse order.
struct Llvm {
    context: *mut mlir_sys::LLVMOpaqueContext,
    module: LLVMModuleRef,
    tm: *mut c_void,
}

impl Drop for Llvm {
    fn drop(&mut self) {
        unsafe {
            if !self.tm.is_null() {
                LLVMDisposeTargetMachine(self.tm);
            }
            if !self.module.is_null() {
                LLVMDisposeModule(self.module);
            }
            LLVMContextDispose(self.context);
        }
    }
}

/// The `llvm`-dialect module translated to LLVM IR, for the host's target machine, optimized
/// with `default<O3>` (loop and SLP vectorizers included).
unsafe fn translate(module: &Module) -> Result<Llvm, MlirError> {
    static INIT: Once = Once::new();
    INIT.call_once(|| unsafe {
        LLVMInitializeX86TargetInfo();
        LLVMInitializeX86Target();
        LLVMInitializeX86TargetMC();
        LLVMInitializeX86AsmPrinter();
    });
    unsafe {
        let context = LLVMContextCreate();
        let mut llvm = Llvm {
            context,
            module: std::ptr::null_mut(),
            tm: std::ptr::null_mut(),
        };
        llvm.module = mlirTranslateModuleToLLVMIR(module.as_operation().to_raw(), context);
        if llvm.module.is_null() {
            return Err(err(
                "translation of the llvm dialect to LLVM IR failed".into()
            ));
        }
        let triple = LLVMGetDefaultTargetTriple();
        let mut target = std::ptr::null_mut();
        let mut message = std::ptr::null_mut();
        if LLVMGetTargetFromTriple(triple, &mut target, &mut message) != 0 {
            let m = take_message(message);
            take_message(triple);
            return Err(BackendError::UnsupportedHost(m).into());
        }
        let cpu = LLVMGetHostCPUName();
        let features = LLVMGetHostCPUFeatures();
        llvm.tm = LLVMCreateTargetMachine(
            target,
            triple,
            cpu,
            features,
            CODEGEN_AGGRESSIVE,
            RELOC_PIC,
            CODE_MODEL_DEFAULT,
        );
        LLVMSetTarget(llvm.module, triple);
        take_message(cpu);
        take_message(features);
        take_message(triple);
        if llvm.tm.is_null() {
            return Err(BackendError::UnsupportedHost(
                "LLVM cannot create a target machine for the host".into(),
            )
            .into());
        }
        let dl = LLVMCreateTargetDataLayout(llvm.tm);
        LLVMSetModuleDataLayout(llvm.module, dl);
        LLVMDisposeTargetData(dl);

        let options = LLVMCreatePassBuilderOptions();
        let passes = CString::new("default<O3>").unwrap();
        let e = LLVMRunPasses(llvm.module, passes.as_ptr(), llvm.tm, options);
        LLVMDisposePassBuilderOptions(options);
        if !e.is_null() {
            let p = LLVMGetErrorMessage(e);
            let m = CStr::from_ptr(p).to_string_lossy().into_owned();
            LLVMDisposeErrorMessage(p);
            return Err(err(format!("LLVM's optimizer failed: {m}")));
        }
        Ok(llvm)
    }
}

unsafe fn emit_object(module: &Module) -> Result<Vec<u8>, MlirError> {
    unsafe {
        let llvm = translate(module)?;
        let mut message = std::ptr::null_mut();
        let mut buf = std::ptr::null_mut();
        if LLVMTargetMachineEmitToMemoryBuffer(
            llvm.tm,
            llvm.module,
            OBJECT_FILE,
            &mut message,
            &mut buf,
        ) != 0
        {
            return Err(BackendError::Object(take_message(message)).into());
        }
        let bytes = std::slice::from_raw_parts(
            LLVMGetBufferStart(buf) as *const u8,
            LLVMGetBufferSize(buf),
        )
        .to_vec();
        LLVMDisposeMemoryBuffer(buf);
        Ok(bytes)
    }
}

// ---------------------------------------------------------------------------------------------
// CUDA: the `gpu` module to PTX.

/// Output of [`compile_ptx`].
#[derive(Debug, Clone)]
pub struct CudaPtx {
    /// The PTX text of the one `gpu.module` (every kernel and support kernel).
    pub ptx: String,
    pub image: loopc_runtime::artifact::CudaImage,
    /// The `gpu`-dialect module before the pipeline (`--stage gpu`).
    pub gpu_text: String,
}

/// Every kernel and the contract's support kernels as PTX for [`gpu::ARCH`](super::gpu::ARCH),
/// with the launch table.
pub fn compile_ptx(kernels: &[KernelDecl]) -> Result<CudaPtx, MlirError> {
    let g = super::gpu::gpu_module(kernels)?;
    let ptx = ptx_of_text(&g.text)?;
    Ok(CudaPtx {
        ptx,
        image: g.image,
        gpu_text: g.text,
    })
}

/// Parse and verify a module holding one `gpu.module`, run
/// [`PTX_PIPELINE`](super::gpu::PTX_PIPELINE) and read the PTX out of the resulting
/// `gpu.binary`.
pub fn ptx_of_text(text: &str) -> Result<String, MlirError> {
    use melior::ir::attribute::AttributeLike;
    use melior::ir::block::BlockLike;
    let mlir = Mlir::new()?;
    let mut module = mlir.parse(text, "the gpu module")?;
    let pm = PassManager::new(&mlir.context);
    parse_pass_pipeline(pm.as_operation_pass_manager(), super::gpu::PTX_PIPELINE)
        .map_err(|e| err(format!("bad pass pipeline: {e}")))?;
    pm.run(&mut module).map_err(|e| {
        err(format!(
            "lowering the gpu module to PTX failed: {e}\n{}",
            mlir.take_diagnostics()
        ))
    })?;
    let body = module.body();
    let mut op = body.first_operation();
    while let Some(o) = op {
        if o.name().as_string_ref().as_str() == Ok("gpu.binary") {
            let objects = o
                .attribute("objects")
                .map_err(|e| err(format!("gpu.binary without objects: {e}")))?;
            unsafe {
                let raw = objects.to_raw();
                if mlir_sys::mlirArrayAttrGetNumElements(raw) != 1 {
                    return Err(err("expected one object in the gpu.binary".into()));
                }
                let obj = mlir_sys::mlirArrayAttrGetElement(raw, 0);
                if !mlir_sys::mlirAttributeIsAGPUObjectAttr(obj) {
                    return Err(err("the gpu.binary's object is not a #gpu.object".into()));
                }
                let s = mlir_sys::mlirGPUObjectAttrGetObject(obj);
                let bytes = std::slice::from_raw_parts(s.data as *const u8, s.length);
                return String::from_utf8(bytes.to_vec())
                    .map_err(|_| err("the PTX is not UTF-8".into()));
            }
        }
        op = o.next_in_block();
    }
    Err(err("the pipeline produced no gpu.binary".into()))
}
