//! The `loadgen` command: parse the options, build a runtime with the asked
//! number of worker threads, run the scenario, print the table on stdout,
//! and write `--json` / `--report`. Exit status: 0 done, 1 the run could not
//! be done, 3 done but problems found with `--strict`.

use std::process::ExitCode;

use clap::Parser;
use loadgen::{report, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Raise the open-files limit before any socket exists.
    let _ = loadgen::limits::raise_nofile();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.common.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let json = cli.common.json.clone();
    let report_path = cli.common.report.clone();
    let strict = cli.common.strict;
    if let loadgen::Scenario::Merge(files) = &cli.scenario {
        return ExitCode::from(merge(&files.files, json.as_deref(), report_path.as_deref(), strict));
    }
    if let loadgen::Scenario::Audit(a) = &cli.scenario {
        return ExitCode::from(audit(a));
    }
    if let loadgen::Scenario::Compare(files) = &cli.scenario {
        return ExitCode::from(compare(&files.files, json.as_deref(), report_path.as_deref()));
    }
    if let loadgen::Scenario::Sweep(_) = cli.scenario {
        let status = sweep(&runtime, cli, json, report_path);
        runtime.shutdown_background();
        return ExitCode::from(status);
    }
    let summary = match runtime.block_on(loadgen::run(cli)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("loadgen: error: {e:#}");
            return ExitCode::from(1);
        }
    };
    print!("{}", report::table(&summary));
    let mut status = 0u8;
    if let Some(path) = json {
        if let Err(e) = report::write_json(&summary, &path) {
            eprintln!("loadgen: {e:#}");
            status = 1;
        }
    }
    if let Some(path) = report_path {
        if let Err(e) = report::write_report(&summary, &path) {
            eprintln!("loadgen: {e:#}");
            status = 1;
        }
    }
    if status == 0 && strict && !summary.ok {
        status = 3;
    }
    // Connection tasks may still be winding down; do not wait for them.
    runtime.shutdown_background();
    ExitCode::from(status)
}

/// `loadgen sweep`: run it, print the table, write the files. The exit
/// status is 0 when the sweep ran (finding the capacity is its purpose, so
/// a step that broke a condition is no failure), 1 when it could not run.
fn sweep(
    runtime: &tokio::runtime::Runtime,
    cli: Cli,
    json: Option<std::path::PathBuf>,
    report_path: Option<std::path::PathBuf>,
) -> u8 {
    use loadgen::sweep_report;
    let summary = match runtime.block_on(loadgen::sweep::run(cli)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("loadgen: error: {e:#}");
            return 1;
        }
    };
    print!("{}", sweep_report::table(&summary));
    let mut status = 0u8;
    if let Some(path) = json {
        if let Err(e) = sweep_report::write_json(&summary, &path) {
            eprintln!("loadgen: {e:#}");
            status = 1;
        }
    }
    if let Some(path) = report_path {
        if let Err(e) = sweep_report::write_report(&summary, &path) {
            eprintln!("loadgen: {e:#}");
            status = 1;
        }
    }
    status
}

/// `loadgen merge`: read the runs, check they belong together, print the
/// merged table and write the files. 1 when the runs cannot be merged, 3
/// with --strict when the whole found problems.
fn merge(
    files: &[std::path::PathBuf],
    json: Option<&std::path::Path>,
    report_path: Option<&std::path::Path>,
    strict: bool,
) -> u8 {
    let runs: anyhow::Result<Vec<_>> =
        files.iter().map(|f| loadgen::merge::read(f).map(|s| (f.display().to_string(), s))).collect();
    let summary = match runs.and_then(|r| loadgen::merge::merge(&r)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("loadgen: cannot merge: {e:#}");
            return 1;
        }
    };
    print!("{}", report::table(&summary));
    if let Some(path) = json {
        if let Err(e) = report::write_json(&summary, path) {
            eprintln!("loadgen: {e:#}");
            return 1;
        }
    }
    if let Some(path) = report_path {
        if let Err(e) = report::write_report(&summary, path) {
            eprintln!("loadgen: {e:#}");
            return 1;
        }
    }
    if strict && !summary.ok {
        3
    } else {
        0
    }
}

/// `loadgen compare`: read the runs, print the table of figures and ratios,
/// write the files. 1 when a file cannot be read.
fn compare(files: &[std::path::PathBuf], json: Option<&std::path::Path>, report_path: Option<&std::path::Path>) -> u8 {
    use loadgen::compare;
    let runs: anyhow::Result<Vec<_>> =
        files.iter().map(|f| loadgen::merge::read(f).map(|s| (f.display().to_string(), s))).collect();
    let runs = match runs {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen: cannot compare: {e:#}");
            return 1;
        }
    };
    let c = compare::compare(&runs);
    print!("{}", compare::table(&c));
    if let Some(path) = json {
        if let Err(e) = compare::write_json(&c, path) {
            eprintln!("loadgen: {e:#}");
            return 1;
        }
    }
    if let Some(path) = report_path {
        if let Err(e) = compare::write_report(&c, &runs, path) {
            eprintln!("loadgen: {e:#}");
            return 1;
        }
    }
    0
}

/// `loadgen audit`: read the record, the run, the faults and the database
/// rows, print the figures and every violation. 0 none, 1 violations, 2 the
/// files could not be read.
fn audit(a: &loadgen::cli::AuditArgs) -> u8 {
    use loadgen::audit;
    let read = || -> anyhow::Result<audit::Input> {
        let run = loadgen::merge::read(&a.run)?;
        let faults = match &a.faults {
            Some(f) => audit::parse_faults(&std::fs::read_to_string(f)?).map_err(anyhow::Error::msg)?,
            None => vec![],
        };
        let db = match &a.db {
            Some(f) => Some(audit::parse_db(&std::fs::read_to_string(f)?)),
            None => None,
        };
        Ok(audit::Input {
            rooms: run.rooms.iter().map(|r| r.name.clone()).collect(),
            events: loadgen::record::read(&a.record_file)?,
            faults,
            db,
            durable: a.durable,
            history_size: a.history_size,
            t0_ns: (run.phases.send_start_unix_s * 1e9) as u64,
        })
    };
    let input = match read() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("loadgen: cannot audit: {e:#}");
            return 2;
        }
    };
    let result = audit::audit(&input);
    print!("{}", result.text(input.t0_ns));
    if result.violations.is_empty() {
        0
    } else {
        1
    }
}
