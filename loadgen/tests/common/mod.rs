//! What every test of loadgen against a real chorus shares: the secret both
//! sides use, and a chorus server started in the test's own process on a
//! free loopback port.

use clap::Parser;

/// The HS256 secret the server trusts and loadgen mints tokens with.
pub const SECRET: &str = "loadgen-against-chorus-secret";

/// `chorus serve`'s options (`ServeArgs` is a flattened `clap::Args`).
#[derive(Parser)]
struct ServeCli {
    #[command(flatten)]
    args: chorus::ServeArgs,
}

/// A chorus server with a per-connection limit of `rate` frames a second
/// (`burst` at once), and more `chorus serve` options in `extra`.
pub async fn start_chorus(rate: &str, burst: &str, extra: &[&str]) -> chorus::Server {
    let mut argv = vec!["chorus", "--listen", "127.0.0.1:0", "--jwt-secret", SECRET, "--rate", rate, "--burst", burst];
    argv.extend_from_slice(extra);
    let cli = ServeCli::try_parse_from(argv).expect("chorus options");
    let config = chorus::Config::from_args(cli.args).expect("chorus configuration");
    chorus::Server::start(config).await.expect("chorus starts")
}
