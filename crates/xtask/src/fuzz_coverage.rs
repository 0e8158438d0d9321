//! `cargo xtask fuzz --coverage`: which lines of the workspace's own crates
//! the committed inputs (seeds, minimised corpus, regressions) reach.
//! libFuzzer's edge count mixes our code with every dependency's; this says
//! whether a run still finds coverage where our checks are, and shows the
//! checks that no input has reached (byte mutation stalls at structure: a
//! pickle inside a zip, shapes inside a JSON header).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::workspace_root;

/// Line coverage of one source file.
#[derive(Debug, PartialEq)]
struct FileLines {
    file: String,
    lines: u64,
    covered: u64,
}

pub fn coverage(toolchain: &str, cargo_fuzz: &Path, target: &str) -> Result<(), String> {
    let root = workspace_root();
    let fuzz_dir = root.join("fuzz");
    let mut command = Command::new("rustup");
    command
        .current_dir(&root)
        .args(["run", toolchain])
        .arg(cargo_fuzz)
        .args(["fuzz", "coverage", target]);
    let inputs: Vec<PathBuf> = ["seeds", "minimised", "regressions"]
        .iter()
        .map(|kind| fuzz_dir.join(kind).join(target))
        .filter(|folder| folder.is_dir())
        .collect();
    if inputs.is_empty() {
        return Err(format!("{target}: no committed inputs under fuzz/ to measure"));
    }
    command.args(&inputs);
    eprintln!("xtask: running {target}'s committed inputs with coverage");
    // One line for each input: shown only if the run fails.
    let output = command
        .output()
        .map_err(|e| format!("cargo fuzz coverage {target}: cannot start: {e}"))?;
    if !output.status.success() {
        let log = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = log.lines().collect();
        return Err(format!(
            "cargo fuzz coverage {target}: failed ({})\n{}",
            output.status,
            lines[lines.len().saturating_sub(30)..].join("\n")
        ));
    }

    let host = rustc_output(toolchain, &["-vV"])?
        .lines()
        .find_map(|line| line.strip_prefix("host: ").map(str::to_string))
        .ok_or("rustc -vV names no host")?;
    let sysroot = rustc_output(toolchain, &["--print", "sysroot"])?;
    let llvm_cov = Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(&host)
        .join("bin/llvm-cov");
    // Where `cargo fuzz coverage` builds when run from the workspace root.
    let binary = root
        .join("target")
        .join(&host)
        .join("coverage")
        .join(&host)
        .join("release")
        .join(target);
    let profile = fuzz_dir.join("coverage").join(target).join("coverage.profdata");
    let crates = root.join("crates");
    let llvm_cov_output = |subcommand: &str| -> Result<String, String> {
        let output = Command::new(&llvm_cov)
            .arg(subcommand)
            .args(if subcommand == "export" {
                &["-summary-only"][..]
            } else {
                &[]
            })
            .arg(&binary)
            .arg(format!("-instr-profile={}", profile.display()))
            .arg("-use-color=false")
            .arg(&crates)
            .output()
            .map_err(|e| format!("{}: {e}", llvm_cov.display()))?;
        if !output.status.success() {
            return Err(format!(
                "llvm-cov {subcommand}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    };

    let files = parse_summary(&llvm_cov_output("export")?)?;
    let listing = fuzz_dir.join("coverage").join(target).join("lines.txt");
    std::fs::write(&listing, llvm_cov_output("show")?).map_err(|e| format!("{}: {e}", listing.display()))?;
    let reached: Vec<&FileLines> = files.iter().filter(|f| f.covered > 0).collect();
    let (lines, covered) = reached
        .iter()
        .fold((0, 0), |(lines, covered), f| (lines + f.lines, covered + f.covered));
    println!(
        "{target}: the committed inputs run {covered} of {lines} lines in the {} files of crates/ they reach \
         ({} files not reached at all)",
        reached.len(),
        files.len() - reached.len()
    );
    for file in reached {
        let short = file
            .file
            .strip_prefix(&format!("{}/", crates.display()))
            .unwrap_or(&file.file);
        println!(
            "  {short:<40} {:>5} of {:>5} lines ({:.0}%)",
            file.covered,
            file.lines,
            100.0 * file.covered as f64 / file.lines.max(1) as f64
        );
    }
    println!(
        "every line with its count (0: never run) in {}; a check no input reaches wants a seed",
        listing.display()
    );
    Ok(())
}

fn rustc_output(toolchain: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new("rustup")
        .args(["run", toolchain, "rustc"])
        .args(args)
        .output()
        .map_err(|e| format!("rustc {}: {e}", args.join(" ")))?;
    if !output.status.success() {
        return Err(format!("rustc {}: failed ({})", args.join(" "), output.status));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The files of `llvm-cov export -summary-only`, with their line counts.
fn parse_summary(export: &str) -> Result<Vec<FileLines>, String> {
    let json: serde_json::Value =
        serde_json::from_str(export).map_err(|e| format!("llvm-cov export: not JSON: {e}"))?;
    let files = json["data"][0]["files"]
        .as_array()
        .ok_or("llvm-cov export: no `data[0].files`")?;
    files
        .iter()
        .map(|file| {
            let lines = &file["summary"]["lines"];
            match (
                file["filename"].as_str(),
                lines["count"].as_u64(),
                lines["covered"].as_u64(),
            ) {
                (Some(name), Some(count), Some(covered)) => Ok(FileLines {
                    file: name.to_string(),
                    lines: count,
                    covered,
                }),
                _ => Err(format!(
                    "llvm-cov export: a file entry without its line summary: {file}"
                )),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_gives_each_files_lines() {
        let export = r#"{"data":[{"files":[
            {"filename":"/repo/crates/core/src/card.rs","summary":{"lines":{"count":132,"covered":63,"percent":47.7}}},
            {"filename":"/repo/crates/core/src/cam.rs","summary":{"lines":{"count":51,"covered":0,"percent":0}}}
        ],"totals":{}}],"type":"llvm.coverage.json.export","version":"2.0.1"}"#;
        assert_eq!(
            parse_summary(export).unwrap(),
            vec![
                FileLines {
                    file: "/repo/crates/core/src/card.rs".into(),
                    lines: 132,
                    covered: 63
                },
                FileLines {
                    file: "/repo/crates/core/src/cam.rs".into(),
                    lines: 51,
                    covered: 0
                },
            ]
        );
        assert!(parse_summary(r#"{"data":[{"files":[{"filename":"a.rs"}]}]}"#).is_err());
        assert!(parse_summary("not json").is_err());
    }
}
