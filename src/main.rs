//! `loopc`: compile looped transformers described in `.loop` files and run them.
mod bench;
mod cli;
mod eval;
mod tokenize;
mod trace_cmd;

fn main() {
    // Rust ignores SIGPIPE, which turns a closed pipe (`loopc ir … | head`) into a panic in
    // `println!`; a command-line tool should just stop, as `cat` does.
    #[cfg(unix)]
    // SAFETY: called first in `main`, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    std::process::exit(cli::main());
}
