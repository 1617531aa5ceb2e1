//! The runtime must run an artifact without any compiler crate: walk the locked dependency
//! closure of `loopc-runtime` and reject code generators, e-graph and MLIR crates.
use std::collections::{HashMap, HashSet};

#[test]
fn runtime_depends_on_no_compiler_crate() {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock")).unwrap();
    let mut deps: HashMap<String, Vec<String>> = HashMap::new();
    for pkg in lock.split("[[package]]").skip(1) {
        let name = pkg
            .lines()
            .find_map(|l| l.strip_prefix("name = "))
            .unwrap()
            .trim_matches('"')
            .to_string();
        let mut ds = vec![];
        if let Some(i) = pkg.find("dependencies = [") {
            for l in pkg[i..].lines().skip(1) {
                if l.starts_with(']') {
                    break;
                }
                // Entries look like `"name"` or `"name version"`.
                ds.push(
                    l.trim()
                        .trim_matches(',')
                        .trim_matches('"')
                        .split(' ')
                        .next()
                        .unwrap()
                        .to_string(),
                );
            }
        }
        deps.entry(name).or_default().extend(ds);
    }
    let mut seen = HashSet::new();
    let mut stack = vec!["loopc-runtime".to_string()];
    while let Some(p) = stack.pop() {
        if seen.insert(p.clone()) {
            stack.extend(deps.get(&p).cloned().unwrap_or_default());
        }
    }
    assert!(
        seen.len() > 5,
        "the lock file parse found the runtime's dependencies: {seen:?}"
    );
    let bad: Vec<&String> = seen
        .iter()
        .filter(|d| {
            d.starts_with("cranelift")
                || d.starts_with("egg")
                || d.starts_with("melior")
                || d.starts_with("mlir")
                || d.as_str() == "loopc-compiler"
                || d.as_str() == "loopc-dialects"
        })
        .collect();
    assert!(bad.is_empty(), "loopc-runtime depends on {bad:?}");
}
