//! `loopc`: compile looped transformers described in `.loop` files and run them.
mod bench;
mod cli;
mod eval;
mod tokenize;
mod trace_cmd;

fn main() {
    std::process::exit(cli::main());
}
