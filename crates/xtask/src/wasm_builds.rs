//! The detector's build with atomics, beside trunk's single-thread one: the
//! page loads `threads/fracture-web.js` when it is cross-origin isolated, and
//! `fracture-web.js` otherwise (web/worker.js). Run by trunk's post-build hook
//! (`cargo xtask site-hook`, Trunk.toml), so `trunk build --release` alone gives both.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{run, tools, workspace_root};

/// Under the site folder; web/worker.js and web/pool-worker.js import from here.
const FOLDER: &str = "threads";

/// Atomics and bulk memory for the shared memory and its waits, the SIMD the
/// single-thread build has too, and the getrandom backend of .cargo/config.toml
/// (RUSTFLAGS replaces that file's flags). The linker must import a shared memory
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

/// Builds the threaded detector into `site/threads/`.
pub fn build_into(site: &Path) -> Result<(), String> {
    let nightly = tools::ensure_threads_toolchain()?;
    let wasm_bindgen = tools::ensure_wasm_bindgen()?;
    let wasm_opt = tools::ensure_wasm_opt()?.join("wasm-opt");
    // Its own target folder: other flags, another std, and no rebuild of the stable artefacts.
    let target_dir = crate::target_dir().join("wasm-threads");

    let mut build = Command::new("cargo");
    build
        .current_dir(workspace_root())
        .env("RUSTUP_TOOLCHAIN", nightly)
        .env("CARGO_ENCODED_RUSTFLAGS", RUSTFLAGS.join("\u{1f}"))
        .env_remove("RUSTFLAGS")
        .env("CARGO_TARGET_DIR", &target_dir)
        .args(["build", "-p", "fracture-web", "--features", "threads", "--release"])
        .args(["--target", tools::WASM_TARGET, "-Z", "build-std=panic_abort,std"]);
    run(
        build,
        &format!("the threaded wasm build ({nightly}, std rebuilt with atomics)"),
    )?;

    let wasm: PathBuf = target_dir
        .join(tools::WASM_TARGET)
        .join("release")
        .join("fracture_web.wasm");
    let out = site.join(FOLDER);
    let mut bindgen = Command::new(wasm_bindgen);
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
    run(bindgen, "wasm-bindgen of the threaded build")?;

    let module = out.join("fracture-web_bg.wasm");
    let mut optimise = Command::new(wasm_opt);
    optimise.arg("-O3").arg(&module).arg("-o").arg(&module);
    run(optimise, "wasm-opt -O3 of the threaded build")
}
