//! `loopc`: compile looped transformers described in `.loop` files and run them.
mod cli;

fn main() {
    std::process::exit(cli::main());
}
