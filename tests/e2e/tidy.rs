//! House-style checks over the source tree (like rust-analyzer's tidy test): every Rust file opens
//! with a `//!` line, the engine names no I/O crate, and no file grows past 600 lines unless it
//! says why in a `// tidy: long file because ...` line.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') && name != "fuzz" {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_rust_file_opens_with_a_module_doc() {
    let mut files = Vec::new();
    for dir in ["src", "proto", "engine", "store", "brokers", "workers", "tests", "benches"] {
        rust_files(&root().join(dir), &mut files);
    }
    assert!(files.len() > 20, "the walk found too few files: {}", files.len());
    let missing: Vec<String> = files
        .iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).unwrap_or_default();
            !text.trim_start().starts_with("//!")
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(missing.is_empty(), "files without a leading //! doc line:\n{}", missing.join("\n"));
}

#[test]
fn no_file_passes_600_lines_without_a_reason() {
    let mut files = Vec::new();
    for dir in ["src", "proto", "engine", "store", "brokers", "workers", "tests", "benches"] {
        rust_files(&root().join(dir), &mut files);
    }
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let text = std::fs::read_to_string(f).ok()?;
            let lines = text.lines().count();
            (lines > 600 && !text.contains("// tidy: long file because"))
                .then(|| format!("{} ({lines} lines)", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "files over 600 lines:\n{}", long.join("\n"));
}

#[test]
fn the_engine_stays_pure() {
    let manifest = std::fs::read_to_string(root().join("engine/Cargo.toml")).expect("engine/Cargo.toml");
    let forbidden = ["tokio", "sqlx", "rdkafka", "lapin", "async-nats", "tonic", "reqwest", "hyper", "rand"];
    for name in forbidden {
        let as_dep = manifest.lines().any(|l| {
            let l = l.trim_start();
            l.starts_with(&format!("{name} "))
                || l.starts_with(&format!("{name}="))
                || l.starts_with(&format!("{name}."))
        });
        assert!(!as_dep, "engine/Cargo.toml depends on `{name}`: the engine crate stays pure");
    }
    let mut files = Vec::new();
    rust_files(&root().join("engine/src"), &mut files);
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        for needle in ["SystemTime::now", "Instant::now", "thread_rng", "std::net::"] {
            assert!(!text.contains(needle), "{} uses {needle}: time and I/O are the runtime's", f.display());
        }
    }
}
