//! `cargo xtask <command>`: the project's set-up and orchestration, in Rust
//! so that it runs wherever cargo does. Every command installs what it
//! needs on a fresh machine (from crates.io, npm and Debian only) and skips
//! tools whose pinned version is already installed.

mod fuzz;
mod fuzz_coverage;
mod models;
mod serve;
mod tools;
mod wasm_builds;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("test-browser") => browser_tests(),
        Some("site") => site().map(|_| ()),
        Some("site-hook") => site_hook(),
        Some("serve") => serve_site(&args[1..]),
        Some("fuzz") => fuzz::fuzz(&args[1..]),
        Some("help") | Some("--help") | Some("-h") | None => {
            println!("{}", usage());
            Ok(())
        }
        Some(other) => Err(format!("unknown command `{other}`\n\n{}", usage())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> &'static str {
    "usage: cargo xtask <command>\n\n\
     commands:\n  \
     test            every test: cargo fmt --check and clippy -D warnings first, then cargo test --workspace, then the site's wasm32 build and the browser suite in headless Chromium\n  \
     test-browser    the browser suite alone\n  \
     site            build the static site into dist/ (trunk build --release; its hook adds the threaded and relaxed-SIMD builds)\n  \
     site-hook       trunk's post-build hook: the threaded and relaxed-SIMD wasm builds and the models' hashes, into trunk's staging folder\n  \
     serve [--port N] build the site and serve it on http://127.0.0.1:N (default 8080)\n  \
     fuzz [TARGET] [--seconds N] [--minimise]  run the cargo-fuzz targets (all, or one of decode_image, model_file, card, pth_import) for N seconds each (default 60), then say when each last found new coverage; --minimise merges what the run found into fuzz/minimised/ (committed)\n  \
     fuzz [TARGET] --coverage  which lines of crates/ the committed fuzz inputs run, file by file, with every line's count in fuzz/coverage/TARGET/lines.txt"
}

pub(crate) fn workspace_root() -> PathBuf {
    // `cargo run` sets the manifest folder at run time too; that one wins, so a binary
    // built in another checkout (a copied target folder) still works on this one.
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from);
    manifest
        .as_deref()
        .unwrap_or(Path::new(env!("CARGO_MANIFEST_DIR")))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Cargo's output folder, wherever CARGO_TARGET_DIR puts it.
pub(crate) fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

pub(crate) fn run(mut command: Command, what: &str) -> Result<(), String> {
    eprintln!("xtask: {what}");
    let started = std::time::Instant::now();
    let status = command.status().map_err(|e| format!("{what}: cannot start: {e}"))?;
    // Each step's time in the log: CI has a time budget, and this says where it goes.
    eprintln!("xtask: {what}: {:.0} s", started.elapsed().as_secs_f64());
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what}: failed ({status})"))
    }
}

/// PATH with the installed tools first, so trunk finds them and never downloads its own.
fn tool_path(extra: &[&Path]) -> std::ffi::OsString {
    let mut paths: Vec<PathBuf> = extra.iter().map(|p| p.to_path_buf()).collect();
    paths.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    std::env::join_paths(paths).unwrap_or_default()
}

/// Builds `dist/` with `trunk build --release`; returns its path.
fn site() -> Result<PathBuf, String> {
    tools::ensure_wasm_target()?;
    let trunk = tools::ensure_trunk()?;
    let wasm_bindgen = tools::ensure_wasm_bindgen()?;
    let wasm_opt_dir = tools::ensure_wasm_opt()?;

    // trunk builds offline, so every crate must be in the local registry first.
    let mut fetch = cargo();
    fetch.arg("fetch");
    run(fetch, "cargo fetch")?;

    let bindgen_dir = wasm_bindgen.parent().unwrap_or(Path::new("."));
    let mut build = Command::new(&trunk);
    build
        .current_dir(workspace_root())
        .env("PATH", tool_path(&[&wasm_opt_dir, bindgen_dir]))
        .args(["build", "--release"]);
    run(build, "trunk build --release")?;
    let dist = workspace_root().join("dist");
    if !dist.join("index.html").is_file() {
        return Err(format!("{} has no index.html after the build", dist.display()));
    }
    Ok(dist)
}

/// Trunk's post-build hook (Trunk.toml), so that `trunk build --release` alone
/// gives the whole site: the threaded and relaxed-SIMD builds beside trunk's, and
/// models.json with each model's hash.
fn site_hook() -> Result<(), String> {
    let staging = std::env::var_os("TRUNK_STAGING_DIR")
        .ok_or("site-hook runs as trunk's post-build hook (TRUNK_STAGING_DIR is not set): use `cargo xtask site`")?;
    let staging = Path::new(&staging);
    models::write_hashes(staging)?;
    wasm_builds::build_into(staging)
}

fn serve_site(args: &[String]) -> Result<(), String> {
    let port = match args {
        [] => 8080,
        [flag, value] if flag == "--port" => value
            .parse()
            .map_err(|_| format!("--port {value}: not a port number"))?,
        _ => return Err(format!("serve takes [--port N]\n\n{}", usage())),
    };
    let dist = site()?;
    let listener =
        TcpListener::bind(("127.0.0.1", port)).map_err(|e| format!("cannot listen on 127.0.0.1:{port}: {e}"))?;
    println!(
        "serving {} on http://127.0.0.1:{port}/ (Ctrl-C to stop)",
        dist.display()
    );
    serve::serve(listener, dist, serve::Headers::Isolation);
    Ok(())
}

fn test(extra: &[String]) -> Result<(), String> {
    gates()?;
    let mut command = cargo();
    command.args(["test", "--workspace"]).args(extra);
    run(command, "cargo test --workspace")?;
    // The site build compiles the browser crate (and the core library) for wasm32.
    browser_tests()
}

/// Formatting and lints, before anything slow: a formatting slip should cost
/// seconds, not the whole suite. The fuzz crate is outside the workspace, so
/// it gets its own format check (clippy there would need its nightly).
fn gates() -> Result<(), String> {
    tools::ensure_lint_components()?;
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--check"]);
    run(fmt, "cargo fmt --check")?;
    let mut fmt_fuzz = cargo();
    fmt_fuzz.args(["fmt", "--manifest-path", "fuzz/Cargo.toml", "--check"]);
    run(fmt_fuzz, "cargo fmt --check (fuzz/)")?;
    let mut clippy = cargo();
    // With the browser's threaded pool too, which the site build compiles only for wasm32 on nightly.
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--features",
        "fracture-web/threads",
    ]);
    clippy.args(["--", "-D", "warnings"]);
    run(clippy, "cargo clippy --workspace --all-targets -D warnings")?;
    // The relaxed-SIMD lanes exist only in the browser's build.
    tools::ensure_wasm_target()?;
    let mut clippy_wasm = cargo();
    clippy_wasm.args(["clippy", "-p", "fracture-web", "--target", tools::WASM_TARGET]);
    clippy_wasm.args(["--features", "relaxed-simd", "--", "-D", "warnings"]);
    run(
        clippy_wasm,
        "cargo clippy -p fracture-web --target wasm32 --features relaxed-simd -D warnings",
    )
}

/// Serves `root` on a free loopback port for the rest of the process; returns its URL.
fn serve_in_background(root: &Path, headers: serve::Headers) -> Result<String, String> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).map_err(|e| format!("cannot listen on loopback: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let root = root.to_path_buf();
    std::thread::spawn(move || serve::serve(listener, root, headers));
    Ok(format!("http://127.0.0.1:{port}/"))
}

/// The browser suite: the release site plus a model trained here on
/// synthetic X-rays, served on loopback, driven in Debian's headless
/// Chromium by playwright-core through node's test runner.
fn browser_tests() -> Result<(), String> {
    let dist = site()?;
    tools::ensure_chromium()?;
    tools::ensure_playwright()?;

    let work = target_dir().join("e2e");
    let _ = std::fs::remove_dir_all(&work);
    let site_copy = work.join("site");
    copy_dir(&dist, &site_copy).map_err(|e| format!("copying {}: {e}", dist.display()))?;

    // `cargo test --workspace` above built it (optimised: see the dev profile) for the
    // CLI tests. Asking for it with the same command is instant; `cargo build --bin`
    // would resolve the dependencies' features without the dev-dependencies and
    // rebuild all of them.
    let mut build = cargo();
    build.args(["test", "--workspace", "--no-run"]);
    run(build, "the fracture binary for the browser tests")?;
    let fracture = target_dir().join("debug").join("fracture");

    // Most static hosts send no isolation headers: the suite runs there (the service
    // worker must isolate the page), and checks `cargo xtask serve`'s headers on a second server.
    let plain_url = serve_in_background(&site_copy, serve::Headers::Plain)?;
    let isolating_url = serve_in_background(&site_copy, serve::Headers::Isolation)?;

    let node_modules = tools::node_tools_dir().join("node_modules");
    let mut node = Command::new("node");
    node.current_dir(workspace_root())
        .env("NODE_PATH", &node_modules)
        .env("FRACTURE_BIN", &fracture)
        .env("FRACTURE_E2E_DIR", &work)
        .env("FRACTURE_SITE_DIR", work.join("site"))
        .env("FRACTURE_BASE_URL", plain_url)
        .env("FRACTURE_ISOLATING_URL", isolating_url)
        .env("CHROMIUM", tools::CHROMIUM)
        .args(["--test", "--test-concurrency=1", "tests/browser/"]);
    run(node, "browser tests (headless Chromium)")
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}
