// Build script shared by `chorus` and `loadgen` (loadgen/build.rs includes
// this file): records which commit a binary was built from, so that
// `--version` and `/metrics` can say it.
//
// It sets three compile-time environment variables:
// - `BUILD_GIT_COMMIT`: `git rev-parse --short HEAD`, or `unknown` when the
//   source is not a git checkout (a tarball) or git is not installed;
// - `BUILD_GIT_DIRTY`: `true` when tracked files differed from HEAD at build
//   time, `false` when not, `unknown` without git;
// - `BUILD_VERSION_LINE`: what `--version` prints after the program's name,
//   e.g. `0.1.0 (commit 32a6c31, clean)`.
//
// Cargo reruns it when HEAD moves (a commit, a checkout, a reset: HEAD, its
// reflog and the branch it names are watched), when the index changes
// (staging, `git status` refreshing it), and when the crate's own sources
// change. A worktree's `.git` is a file pointing elsewhere, so the files to
// watch come from `git rev-parse --git-path`, which knows where each lives.
//
// (Plain comments, not `//!`: loadgen/build.rs include!s this file, where an
// inner doc comment is not allowed.)

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let version = std::env::var("CARGO_PKG_VERSION").expect("cargo sets CARGO_PKG_VERSION");

    // The crate's sources: an edit there can turn a clean tree dirty. (Emitting
    // any rerun-if-changed replaces cargo's default of watching the whole
    // package, which would include target/ for the root crate.)
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=Cargo.toml");
    println!("cargo:rerun-if-changed=src");

    let (commit, dirty) = match git(&manifest_dir, &["rev-parse", "--short", "HEAD"]) {
        Some(commit) => {
            watch_git_state(&manifest_dir);
            // --no-optional-locks: do not rewrite the index while looking, or the
            // index we watch would change under us and rerun this every build.
            let dirty =
                match git(&manifest_dir, &["--no-optional-locks", "status", "--porcelain", "--untracked-files=no"]) {
                    Some(changes) if changes.is_empty() => "false",
                    Some(_) => "true",
                    None => "unknown",
                };
            (commit, dirty)
        }
        None => ("unknown".to_owned(), "unknown"),
    };

    let state = match dirty {
        "false" => ", clean",
        "true" => ", dirty",
        _ => "",
    };
    println!("cargo:rustc-env=BUILD_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=BUILD_GIT_DIRTY={dirty}");
    println!("cargo:rustc-env=BUILD_VERSION_LINE={version} (commit {commit}{state})");
}

/// Asks cargo to rerun this script when HEAD, its reflog, the branch it names,
/// the packed refs or the index change. Only existing files are named: cargo treats a
/// missing one as always changed.
fn watch_git_state(dir: &Path) {
    // logs/HEAD, the worktree's reflog, grows with every commit, checkout and
    // reset, even when the branch lives only in packed-refs (a fresh clone)
    // and the commit writes a loose ref file nobody watched yet.
    let mut watched = ["HEAD", "logs/HEAD", "index", "packed-refs"].map(str::to_owned).to_vec();
    if let Some(branch) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        watched.push(branch); // refs/heads/<name>, in the common directory
    }
    for name in watched {
        // Relative to `dir` when git prints a relative path (joining keeps an absolute one).
        if let Some(path) = git(dir, &["rev-parse", "--git-path", &name]).map(|p| dir.join(p)) {
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
}

/// The trimmed standard output of `git args` run in `dir`, or None when git is
/// missing, fails (not a repository) or prints something that is not UTF-8.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).current_dir(dir).output().ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8(output.stdout).ok().map(|s| s.trim().to_owned())
}
