//! loopc's own rewrite of the `loop` dialect's recurrence into upstream ops, for the passes that
//! know nothing of `loop.recur`: each
//! `"loop.recur"(%state, %next, %inj...) {body = @f, steps = N}` becomes
//!
//! ```mlir
//! scf.for %t = 0 to N step 1 {
//!   func.call @f(%state, %next, (memref.cast %inj to the parameter's type)...)
//!   memref.copy %next, %state      // the next state becomes the state
//! }
//! ```
//!
//! i.e. the fixed-depth reading of the loop (`steps` iterations); the data-dependent exits of
//! `loop.exit` stay in the body for the runtime, which is what executes the structure on CPU.

use super::native::Mlir;
use super::MlirError;
use melior::dialect::{arith, func, scf};
use melior::ir::attribute::{
    FlatSymbolRefAttribute, IntegerAttribute, StringAttribute, TypeAttribute,
};
use melior::ir::operation::{OperationBuilder, OperationLike, OperationRef, WalkOrder, WalkResult};
use melior::ir::r#type::FunctionType;
use melior::ir::{Block, BlockLike, Location, Module, Region, RegionLike, Type, Value, ValueLike};
use melior::IrRewriter;

fn err(m: String) -> MlirError {
    MlirError::Mlir(m)
}

/// The input types of the `func.func` named `name` at the top level of `module`.
fn func_inputs<'c>(module: &Module<'c>, name: &str) -> Result<Vec<Type<'c>>, MlirError> {
    let mut op = module.body().first_operation();
    while let Some(o) = op {
        let sym = o
            .attribute("sym_name")
            .ok()
            .and_then(|a| StringAttribute::try_from(a).ok())
            .map(|s| s.value().to_string());
        if o.name().as_string_ref().as_str() == Ok("func.func") && sym.as_deref() == Some(name) {
            let ty = o
                .attribute("function_type")
                .ok()
                .and_then(|a| TypeAttribute::try_from(a).ok())
                .ok_or_else(|| err(format!("@{name} has no function type")))?;
            let f = FunctionType::try_from(ty.value()).map_err(|e| err(format!("@{name}: {e}")))?;
            return (0..f.input_count())
                .map(|i| f.input(i).map_err(|e| err(e.to_string())))
                .collect();
        }
        op = o.next_in_block();
    }
    Err(err(format!("the recurrence body @{name} is not defined")))
}

impl Mlir {
    /// Rewrite every `loop.recur` of `module` into `scf.for`; returns how many there were.
    pub fn lower_recur(&self, module: &mut Module) -> Result<usize, MlirError> {
        let ctx = &self.context;
        let mut recurs = vec![];
        module.as_operation().walk(WalkOrder::PreOrder, |op| {
            if op.name().as_string_ref().as_str() == Ok("loop.recur") {
                recurs.push(op.to_raw());
            }
            WalkResult::Advance
        });
        let loc = Location::unknown(ctx);
        let index = Type::index(ctx);
        for raw in &recurs {
            let op = unsafe { OperationRef::from_raw(*raw) };
            let body = op
                .attribute("body")
                .ok()
                .and_then(|a| FlatSymbolRefAttribute::try_from(a).ok())
                .ok_or_else(|| err("loop.recur without a body symbol".into()))?;
            let steps = op
                .attribute("steps")
                .ok()
                .and_then(|a| IntegerAttribute::try_from(a).ok())
                .ok_or_else(|| err("loop.recur without steps".into()))?
                .value();
            let params = func_inputs(module, body.value())?;
            let operands: Vec<Value> = op.operands().collect();
            if operands.len() != params.len() || operands.len() < 2 {
                return Err(err(format!(
                    "loop.recur passes {} values to @{} of {} parameters",
                    operands.len(),
                    body.value(),
                    params.len()
                )));
            }

            let ir_rewriter = IrRewriter::new(ctx);
            let rewriter = ir_rewriter.as_rewriter_base();
            rewriter.set_insertion_point_before(op);
            let c = |v: i64| {
                rewriter
                    .insert(arith::constant(
                        ctx,
                        IntegerAttribute::new(index, v).into(),
                        loc,
                    ))
                    .result(0)
                    .map(Value::from)
            };
            let lo = c(0).map_err(|e| err(e.to_string()))?;
            let hi = c(steps).map_err(|e| err(e.to_string()))?;
            let one = c(1).map_err(|e| err(e.to_string()))?;

            let block = Block::new(&[(index, loc)]);
            let mut args = vec![];
            for (v, ty) in operands.iter().zip(&params) {
                if v.r#type() == *ty {
                    args.push(*v);
                } else {
                    // Injected values travel unranked (see the dialect); the body is typed.
                    let cast = block.append_operation(
                        OperationBuilder::new("memref.cast", loc)
                            .add_operands(&[*v])
                            .add_results(&[*ty])
                            .build()
                            .map_err(|e| err(e.to_string()))?,
                    );
                    args.push(cast.result(0).map_err(|e| err(e.to_string()))?.into());
                }
            }
            block.append_operation(func::call(ctx, body, &args, &[], loc));
            block.append_operation(
                OperationBuilder::new("memref.copy", loc)
                    .add_operands(&[operands[1], operands[0]])
                    .build()
                    .map_err(|e| err(e.to_string()))?,
            );
            block.append_operation(scf::r#yield(&[], loc));
            let region = Region::new();
            region.append_block(block);
            rewriter.insert(scf::r#for(lo, hi, one, region, loc));
            rewriter.erase_op(op);
        }
        if !module.as_operation().verify() {
            return Err(err(
                "the module after lowering loop.recur fails the verifier".into(),
            ));
        }
        Ok(recurs.len())
    }
}

/// `loopc ir --stage mlir` text with its recurrence rewritten into `scf.for`, verified.
pub fn lower_recur_text(text: &str) -> Result<String, MlirError> {
    let mlir = Mlir::new()?;
    let mut module = mlir.parse(text, "the module")?;
    mlir.lower_recur(&mut module)?;
    Ok(module.as_operation().to_string())
}
