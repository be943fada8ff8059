//! The code's layout, checked: no import loops between the library's top-level modules, and
//! no source file over 600 lines (docs/ARCHITECTURE.md).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/a/b.rs` and `src/a.rs` both belong to module `a`.
fn top_module(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The top-level modules a file's code (not its comments or unit tests) names as `crate::x`.
fn uses(text: &str) -> BTreeSet<String> {
    let code = text
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or("")
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(list) = rest.strip_prefix('{') {
            // `use crate::{a, b::c}`
            let inner = &list[..list.find('}').unwrap_or(list.len())];
            for part in inner.split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            found.insert(name);
        }
    }
    found
}

/// Every path from a module back to itself.
fn loops(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut loops = Vec::new();
    for start in graph.keys() {
        let mut stack = vec![vec![start.clone()]];
        let mut seen = BTreeSet::new();
        while let Some(path) = stack.pop() {
            let last = path.last().unwrap();
            for next in graph.get(last).into_iter().flatten() {
                if next == start {
                    let mut l = path.clone();
                    l.push(start.clone());
                    loops.push(l.join(" -> "));
                } else if graph.contains_key(next) && seen.insert(next.clone()) {
                    let mut p = path.clone();
                    p.push(next.clone());
                    stack.push(p);
                }
            }
        }
    }
    loops
}

#[test]
fn no_import_loops_and_no_file_over_600_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut long = Vec::new();
    for f in &files {
        let text = fs::read_to_string(f).unwrap();
        let module = top_module(&src, f);
        graph.entry(module.clone()).or_default();
        if module != "lib" {
            let deps = uses(&text).into_iter().filter(|d| *d != module);
            graph.get_mut(&module).unwrap().extend(deps);
        }
        let lines = text.lines().count();
        if lines > 600 {
            long.push(format!("{} ({lines} lines)", f.display()));
        }
    }
    for dir in ["cli", "daemon"] {
        let mut bins = Vec::new();
        rust_files(&root.join(dir), &mut bins);
        for f in bins {
            let lines = fs::read_to_string(&f).unwrap().lines().count();
            if lines > 600 {
                long.push(format!("{} ({lines} lines)", f.display()));
            }
        }
    }
    assert!(long.is_empty(), "split by noun: {long:?}");
    assert!(
        graph.len() > 20,
        "the library's modules were found: {graph:?}"
    );

    let loops = loops(&graph);
    assert!(loops.is_empty(), "import loops: {loops:#?}");
}

#[test]
fn the_checker_sees_a_loop_and_a_list() {
    let found = uses(
        "use crate::{backup::Source, copy};\nfn f() { crate::drill::run() } // crate::x\n#[cfg(test)]\nmod tests { use crate::jobs; }",
    );
    let want: BTreeSet<String> = ["backup", "copy", "drill"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(found, want);
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("backup", vec!["repository", "copy"]),
        ("copy", vec!["backup"]),
        ("repository", vec![]),
    ]
    .into_iter()
    .map(|(m, d)| (m.to_string(), d.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(
        loops(&graph),
        ["backup -> copy -> backup", "copy -> backup -> copy"]
    );
}
