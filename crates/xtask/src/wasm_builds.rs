//! The detector's builds beside trunk's single-thread one. Two axes: threads (a
//! build with atomics, for cross-origin isolated pages) and relaxed SIMD (the
//! products on fused multiply-add, for browsers that validate it; Safari rejects
//! a module that merely contains such an instruction). web/worker.js picks one of
//!
//! | folder | threads | relaxed SIMD |
//! | --- | --- | --- |
//! | (the site root, trunk's) | no | no |
//! | `relaxed/` | no | yes |
//! | `threads/` | yes | no |
//! | `threads-relaxed/` | yes | yes |
//!
//! Run by trunk's post-build hook (`cargo xtask site-hook`, Trunk.toml), so
//! `trunk build --release` alone gives all four.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{run, tools, workspace_root};

/// The threaded builds' flags: atomics and bulk memory for the shared memory and
/// its waits, the SIMD the single-thread build has too, and the getrandom backend
/// of .cargo/config.toml (RUSTFLAGS replaces that file's flags). The linker must import a shared memory
/// and export the TLS symbols that wasm-bindgen's thread start-up calls; 2 GiB is
/// the most the memory may grow to (a shared memory must declare a maximum).
const RUSTFLAGS: &[&str] = &[
    "--cfg",
    "getrandom_backend=\"wasm_js\"",
    "-C",
    "target-feature=+simd128,+atomics,+bulk-memory,+mutable-globals",
    "-C",
    "link-arg=--shared-memory",
    "-C",
    "link-arg=--import-memory",
    "-C",
    "link-arg=--max-memory=2147483648",
    "-C",
    "link-arg=--export=__wasm_init_tls",
    "-C",
    "link-arg=--export=__tls_size",
    "-C",
    "link-arg=--export=__tls_align",
    "-C",
    "link-arg=--export=__tls_base",
];

/// One of the builds the hook adds.
struct Variant {
    /// Under the site folder; web/worker.js imports `FOLDER/fracture-web.js`.
    folder: &'static str,
    threads: bool,
    relaxed_simd: bool,
}

const VARIANTS: [Variant; 3] = [
    Variant {
        folder: "relaxed",
        threads: false,
        relaxed_simd: true,
    },
    Variant {
        folder: "threads",
        threads: true,
        relaxed_simd: false,
    },
    Variant {
        folder: "threads-relaxed",
        threads: true,
        relaxed_simd: true,
    },
];

/// Builds every variant into its folder of `site`.
pub fn build_into(site: &Path) -> Result<(), String> {
    let found = BuildTools {
        wasm_bindgen: tools::ensure_wasm_bindgen()?,
        wasm_opt: tools::ensure_wasm_opt()?.join("wasm-opt"),
    };
    for variant in &VARIANTS {
        build_variant(variant, &found, site)?;
    }
    Ok(())
}

/// What every variant's build runs after cargo, found (or installed) once.
struct BuildTools {
    wasm_bindgen: PathBuf,
    wasm_opt: PathBuf,
}

fn build_variant(variant: &Variant, found: &BuildTools, site: &Path) -> Result<(), String> {
    let features: Vec<&str> = [(variant.threads, "threads"), (variant.relaxed_simd, "relaxed-simd")]
        .into_iter()
        .filter_map(|(on, feature)| on.then_some(feature))
        .collect();
    let mut build = Command::new("cargo");
    build
        .current_dir(workspace_root())
        .args([
            "build",
            "-p",
            "fracture-web",
            "--release",
            "--target",
            tools::WASM_TARGET,
        ])
        .args(["--features", &features.join(",")]);
    // The features change only this workspace's two crates, so each build shares its
    // dependencies (and, threaded, the rebuilt std) with the other of its kind.
    let target_dir = if variant.threads {
        let nightly = tools::ensure_threads_toolchain()?;
        let target_dir = crate::target_dir().join("wasm-threads");
        build
            .env("RUSTUP_TOOLCHAIN", nightly)
            .env("CARGO_ENCODED_RUSTFLAGS", RUSTFLAGS.join("\u{1f}"))
            .env_remove("RUSTFLAGS")
            .env("CARGO_TARGET_DIR", &target_dir)
            .args(["-Z", "build-std=panic_abort,std"]);
        target_dir
    } else {
        // Trunk's own target folder and flags (.cargo/config.toml).
        crate::target_dir()
    };
    let what = format!("the {} wasm build", variant.folder);
    run(build, &what)?;

    let wasm: PathBuf = target_dir
        .join(tools::WASM_TARGET)
        .join("release")
        .join("fracture_web.wasm");
    let out = site.join(variant.folder);
    let mut bindgen = Command::new(&found.wasm_bindgen);
    bindgen
        .args([
            "--target",
            "web",
            "--no-typescript",
            "--out-name",
            "fracture-web",
            "--out-dir",
        ])
        .arg(&out)
        .arg(&wasm);
    run(bindgen, &format!("wasm-bindgen of {what}"))?;

    let module = out.join("fracture-web_bg.wasm");
    let mut optimise = Command::new(&found.wasm_opt);
    optimise.arg("-O3").arg(&module).arg("-o").arg(&module);
    run(optimise, &format!("wasm-opt -O3 of {what}"))
}
