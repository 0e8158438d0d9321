//! `cargo xtask fuzz`: the cargo-fuzz targets under libFuzzer, each run
//! summarised by how long it went without finding new coverage, and
//! `--minimise` to keep what a run found in the committed corpus so that the
//! next run, on any machine, starts where this one stopped.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{tools, workspace_root};

pub const TARGETS: [&str; 4] = ["decode_image", "model_file", "card", "pth_import"];

#[derive(Debug)]
struct Options {
    targets: Vec<&'static str>,
    seconds: u64,
    minimise: bool,
    coverage: bool,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut options = Options {
        targets: Vec::new(),
        seconds: 60,
        minimise: false,
        coverage: false,
    };
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--seconds" => {
                let value = rest.next().ok_or("--seconds needs a number")?;
                options.seconds = value
                    .parse()
                    .map_err(|_| format!("--seconds {value}: not a number of seconds"))?;
            }
            "--minimise" => options.minimise = true,
            "--coverage" => options.coverage = true,
            name => match TARGETS.iter().find(|t| **t == name) {
                Some(target) => options.targets.push(target),
                None => {
                    return Err(format!(
                        "unknown fuzz target or flag `{name}` (targets: {})",
                        TARGETS.join(", ")
                    ))
                }
            },
        }
    }
    if options.targets.is_empty() {
        options.targets = TARGETS.to_vec();
    }
    if options.coverage && options.minimise {
        return Err(
            "--coverage measures the committed inputs; it does not fuzz, so there is nothing to --minimise".into(),
        );
    }
    Ok(options)
}

/// Runs the targets from their working corpus (`fuzz/corpus/`, not committed),
/// the committed minimised corpus (`fuzz/minimised/`) and the seeds. A crash
/// stops the run and leaves its input in `fuzz/artifacts/TARGET/`; once fixed,
/// it goes to `fuzz/regressions/TARGET/`, which the tests replay.
pub fn fuzz(args: &[String]) -> Result<(), String> {
    let options = parse(args)?;
    if options.coverage {
        let toolchain = tools::ensure_fuzz_coverage_toolchain()?;
        let cargo_fuzz = tools::ensure_cargo_fuzz()?;
        for &target in &options.targets {
            crate::fuzz_coverage::coverage(toolchain, &cargo_fuzz, target)?;
        }
        return Ok(());
    }
    let toolchain = tools::ensure_fuzz_toolchain()?;
    let cargo_fuzz = tools::ensure_cargo_fuzz()?;
    let fuzz_dir = workspace_root().join("fuzz");
    let mut summaries = Vec::new();
    for &target in &options.targets {
        let corpus = fuzz_dir.join("corpus").join(target);
        let minimised = fuzz_dir.join("minimised").join(target);
        for folder in [&corpus, &minimised] {
            std::fs::create_dir_all(folder).map_err(|e| format!("{}: {e}", folder.display()))?;
        }
        let mut command = cargo_fuzz_run(toolchain, &cargo_fuzz, target);
        command
            .arg(&corpus)
            .arg(&minimised)
            .arg(fuzz_dir.join("seeds").join(target))
            // Out of memory at 2 GiB, a hang at 10 s an input: both count as crashes.
            .args([
                "--",
                &format!("-max_total_time={}", options.seconds),
                "-rss_limit_mb=2048",
                "-timeout=10",
                "-print_final_stats=1",
            ]);
        let progress = run_watching_coverage(command, target)?;
        eprintln!("xtask: {}", progress.summary(target));
        summaries.push(progress.summary(target));
        if options.minimise {
            minimise(toolchain, &cargo_fuzz, target, &corpus, &minimised)?;
        }
    }
    if summaries.len() > 1 {
        eprintln!("xtask: fuzzing done:");
        for summary in &summaries {
            eprintln!("  {summary}");
        }
    }
    Ok(())
}

fn cargo_fuzz_run(toolchain: &str, cargo_fuzz: &Path, target: &str) -> Command {
    let mut command = Command::new("rustup");
    command
        .current_dir(workspace_root())
        .args(["run", toolchain])
        .arg(cargo_fuzz)
        .args(["fuzz", "run", "--release", "--debug-assertions", target]);
    command
}

/// Runs libFuzzer with its log passed through, noting when coverage last
/// grew; a run that ends in a crash is an error, after its summary.
fn run_watching_coverage(mut command: Command, target: &str) -> Result<Progress, String> {
    let what = format!("fuzzing {target}");
    eprintln!("xtask: {what}");
    let mut child = command
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    let mut progress = Progress::default();
    let mut fuzzing_since: Option<Instant> = None;
    if let Some(stderr) = child.stderr.take() {
        let mut echo = std::io::stderr();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            // The clock starts once libFuzzer has read its corpus, not while cargo builds.
            if line.contains("INITED") {
                fuzzing_since.get_or_insert_with(Instant::now);
            }
            let elapsed = fuzzing_since.map(|t| t.elapsed()).unwrap_or_default();
            progress.observe(&line, elapsed);
            let _ = writeln!(echo, "{line}");
        }
    }
    let status = child.wait().map_err(|e| format!("{what}: {e}"))?;
    progress.ran_for = fuzzing_since.map(|t| t.elapsed()).unwrap_or_default();
    if status.success() {
        Ok(progress)
    } else {
        Err(format!("{what}: failed ({status}); {}", progress.summary(target)))
    }
}

/// Merges the minimised corpus and this run's working corpus into a new
/// minimised corpus: the fewest inputs that keep every feature either found.
fn minimise(toolchain: &str, cargo_fuzz: &Path, target: &str, corpus: &Path, minimised: &Path) -> Result<(), String> {
    let merged: PathBuf = minimised.with_extension("merging");
    if merged.exists() {
        std::fs::remove_dir_all(&merged).map_err(|e| format!("{}: {e}", merged.display()))?;
    }
    std::fs::create_dir_all(&merged).map_err(|e| format!("{}: {e}", merged.display()))?;
    let before = folder_size(minimised);
    let mut command = cargo_fuzz_run(toolchain, cargo_fuzz, target);
    command
        .arg(&merged)
        .arg(minimised)
        .arg(corpus)
        .args(["--", "-merge=1", "-rss_limit_mb=2048", "-timeout=10"]);
    crate::run(command, &format!("minimising the {target} corpus"))?;
    std::fs::remove_dir_all(minimised).map_err(|e| format!("{}: {e}", minimised.display()))?;
    std::fs::rename(&merged, minimised).map_err(|e| format!("{}: {e}", minimised.display()))?;
    let after = folder_size(minimised);
    eprintln!(
        "xtask: {}: {} inputs ({} KiB), was {} ({} KiB); commit it so the next run starts from here",
        minimised.display(),
        after.0,
        after.1 / 1024,
        before.0,
        before.1 / 1024
    );
    Ok(())
}

/// Files and bytes in a folder.
fn folder_size(folder: &Path) -> (usize, u64) {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return (0, 0);
    };
    entries
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .fold((0, 0), |(n, bytes), m| (n + 1, bytes + m.len()))
}

/// What libFuzzer's status lines said: executions, coverage (edges, `cov:`)
/// and features (`ft:`, finer than edges), and when each last grew.
#[derive(Debug, Default, PartialEq)]
struct Progress {
    runs: u64,
    edges: u64,
    features: u64,
    last_new_edge: Duration,
    last_new_feature: Duration,
    ran_for: Duration,
    /// When the edge count grew, and to what: what a run added, and whether
    /// its last quarter still added any, say more than one "last new" time.
    edge_history: Vec<(Duration, u64)>,
    /// Edges of the corpus the run started from (libFuzzer's `INITED` line).
    initial_edges: u64,
}

impl Progress {
    /// Reads one line of libFuzzer's log, e.g.
    /// `#4096 NEW cov: 812 ft: 3456 corp: 120/40Kb lim: 4096 exec/s: 2048 rss: 90Mb`
    /// (a tab after the run count, spaces between the fields).
    fn observe(&mut self, line: &str, elapsed: Duration) {
        let Some(status) = line.strip_prefix('#') else {
            return;
        };
        let mut words = status.split_whitespace();
        let Some(runs) = words.next().and_then(|w| w.parse::<u64>().ok()) else {
            return;
        };
        self.runs = self.runs.max(runs);
        let mut words = words.peekable();
        let initialised = words.peek() == Some(&"INITED");
        while let Some(word) = words.next() {
            let number = words.peek().and_then(|w| w.parse::<u64>().ok());
            match word {
                "cov:" => {
                    if let Some(edges) = number {
                        if edges > self.edges {
                            self.edges = edges;
                            self.last_new_edge = elapsed;
                            self.edge_history.push((elapsed, edges));
                        }
                        if initialised {
                            self.initial_edges = edges;
                        }
                    }
                }
                "ft:" => {
                    if let Some(features) = number {
                        if features > self.features {
                            self.features = features;
                            self.last_new_feature = elapsed;
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Edges known at `time` into the run.
    fn edges_at(&self, time: Duration) -> u64 {
        self.edge_history
            .iter()
            .take_while(|(at, _)| *at <= time)
            .last()
            .map_or(self.initial_edges, |&(_, edges)| edges.max(self.initial_edges))
    }

    fn summary(&self, target: &str) -> String {
        let ran = self.ran_for.as_secs();
        let last_quarter_from = self.ran_for.mul_f64(0.75);
        format!(
            "{target}: {} runs in {ran} s; {} edges (+{} in this run, +{} in its last quarter, from {} s), {} features; \
             last new edge at {} s, last new feature at {} s ({} s without)",
            self.runs,
            self.edges,
            self.edges - self.initial_edges,
            self.edges - self.edges_at(last_quarter_from),
            last_quarter_from.as_secs(),
            self.features,
            self.last_new_edge.as_secs(),
            self.last_new_feature.as_secs(),
            ran.saturating_sub(self.last_new_feature.as_secs()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_growth_is_timed_from_libfuzzer_status_lines() {
        let mut progress = Progress::default();
        let lines = [
            ("INFO: Seed: 12345", 0),
            // Read while loading the corpus, before the clock starts.
            ("#8\tpulse  cov: 50 ft: 90 exec/s: 0 rss: 40Mb", 0),
            // The clock starts on this line, so it is a moment past zero.
            ("#10\tINITED cov: 100 ft: 300 corp: 10/2Kb exec/s: 0 rss: 40Mb", 1),
            (
                "#50\tNEW    cov: 120 ft: 350 corp: 11/3Kb lim: 4 exec/s: 0 rss: 41Mb L: 3/4 MS: 1 ChangeBit-",
                5000,
            ),
            (
                "#4096\tpulse  cov: 120 ft: 350 corp: 11/3Kb lim: 4 exec/s: 800 rss: 41Mb",
                9000,
            ),
            (
                "#5000\tREDUCE cov: 120 ft: 360 corp: 11/3Kb lim: 4 exec/s: 700 rss: 41Mb L: 2/4 MS: 1 EraseBytes-",
                20000,
            ),
            (
                "#6000\tDONE   cov: 120 ft: 360 corp: 11/3Kb lim: 4 exec/s: 600 rss: 41Mb",
                30000,
            ),
            ("Done 6000 runs in 30 second(s)", 30_000),
        ];
        for (line, at) in lines {
            progress.observe(line, Duration::from_millis(at));
        }
        progress.ran_for = Duration::from_secs(30);
        assert_eq!(progress.runs, 6000);
        assert_eq!((progress.edges, progress.features), (120, 360));
        assert_eq!(progress.last_new_edge, Duration::from_secs(5));
        assert_eq!(progress.last_new_feature, Duration::from_secs(20));
        let summary = progress.summary("card");
        assert!(summary.contains("(10 s without)"), "{summary}");
        assert!(
            summary.contains("120 edges (+20 in this run, +0 in its last quarter, from 22 s)"),
            "{summary}"
        );
        progress.observe(
            "#7000\tNEW    cov: 125 ft: 361 corp: 12/3Kb lim: 4 exec/s: 600 rss: 41Mb",
            Duration::from_secs(40),
        );
        progress.ran_for = Duration::from_secs(40);
        let summary = progress.summary("card");
        assert!(
            summary.contains("125 edges (+25 in this run, +5 in its last quarter, from 30 s)"),
            "{summary}"
        );
    }

    #[test]
    fn targets_and_flags_parse() {
        let args: Vec<String> = ["card", "--seconds", "90", "--minimise"].map(String::from).to_vec();
        let options = parse(&args).unwrap();
        assert_eq!(
            (options.targets, options.seconds, options.minimise),
            (vec!["card"], 90, true)
        );
        assert_eq!(parse(&[]).unwrap().targets.len(), TARGETS.len());
        assert!(parse(&["nope".to_string()]).unwrap_err().contains("decode_image"));
        assert!(parse(&["--seconds".to_string(), "x".to_string()]).is_err());
        let coverage = parse(&["pth_import".to_string(), "--coverage".to_string()]).unwrap();
        assert!(coverage.coverage && !coverage.minimise);
        assert!(parse(&["--coverage".to_string(), "--minimise".to_string()]).is_err());
    }
}
