//! Code generators. Each backend turns the kernel list of a lowered program into native code.
pub mod cranelift;
pub mod mlir;
