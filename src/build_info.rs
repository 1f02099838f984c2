//! Which build this is: the crate version and the commit it was built from,
//! for `chorus --version`, the start-up log and the `chorus_build_info`
//! gauge. build.rs finds them with git at build time; a build from a
//! tarball without `.git` says `unknown`.

/// The crate version, `0.1.0`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The short commit hash of the checkout, or `unknown`.
pub const COMMIT: &str = env!("BUILD_GIT_COMMIT");

/// `true` when tracked files differed from the commit at build time, `false`
/// when not, `unknown` without git.
pub const DIRTY: &str = env!("BUILD_GIT_DIRTY");

/// What `--version` prints after the name: `0.1.0 (commit 32a6c31, clean)`.
pub const VERSION_LINE: &str = env!("BUILD_VERSION_LINE");
