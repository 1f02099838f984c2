//! The `chorus` command: `chorus serve` runs a server, `chorus token` mints
//! a token for it.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use chorus::auth::NewToken;
use chorus::config::KeySource;
use chorus::server::Drain;
use chorus::{Config, ServeArgs, Server};

#[derive(Parser)]
#[command(name = "chorus", version = chorus::build_info::VERSION_LINE, about = "A real-time chat and fanout WebSocket server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start; boxing the larger variant would save nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run a server.
    Serve(Box<ServeArgs>),
    /// Print a signed HS256 token.
    Token(TokenArgs),
}

#[derive(clap::Args)]
struct TokenArgs {
    /// The server's HS256 secret.
    #[arg(long, env = "CHORUS_JWT_SECRET", hide_env_values = true)]
    secret: String,
    /// The user id (`sub`).
    #[arg(long)]
    sub: String,
    /// Comma-separated room patterns the token allows (`lobby,team-*`); all rooms when absent.
    #[arg(long, value_delimiter = ',')]
    rooms: Option<Vec<String>>,
    /// How long the token is valid.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// `iss` claim.
    #[arg(long)]
    issuer: Option<String>,
    /// `aud` claim.
    #[arg(long)]
    audience: Option<String>,
}

/// How long shutdown waits for connections to close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Token(args) => print_token(args),
        Command::Serve(args) => {
            chorus::logging::init(args.log_format);
            let config = Config::from_args(*args).context("invalid configuration")?;
            let runtime = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
            runtime.block_on(serve(config))
        }
    }
}

fn print_token(args: TokenArgs) -> anyhow::Result<()> {
    let mut token = NewToken::new(&args.sub, args.ttl);
    token.rooms = args.rooms;
    token.iss = args.issuer;
    token.aud = args.audience;
    println!("{}", token.sign_hs256(args.secret.as_bytes()).context("cannot sign the token")?);
    Ok(())
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // Handle the signals before the banner announces the server: a signal
    // right after it must shut down gracefully, not kill the process.
    let signals = Signals::new()?;
    let (drain_period, close_spread) = (config.drain_period, config.close_spread);
    let banner = Banner::from_config(&config);
    tracing::info!("chorus {}", chorus::build_info::VERSION_LINE);
    let server = Server::start(config).await.context("cannot start the server")?;
    banner.print(server.local_addr(), server.admin_addr())?;
    if let Some(tls) = server.tls() {
        tokio::spawn(reload_on_sighup(tls)?);
    }
    let plan = Drain { period: drain_period, spread: close_spread, grace: SHUTDOWN_GRACE };
    let mut signals = signals;
    signals.next().await;
    tracing::info!(?plan, "shutting down: draining, then closing connections");
    // A second signal skips the rest of the drain; a third exits at once.
    let hurry = async move {
        signals.next().await;
        tokio::spawn(async move {
            signals.next().await;
            tracing::warn!("third signal: exiting without finishing the shutdown");
            std::process::exit(130);
        });
    };
    server.drain(plan, hurry).await;
    Ok(())
}

/// What to print at start: always the address, and a working token when the
/// server made its own secret.
struct Banner {
    /// `wss` with `--tls-cert`, else `ws`.
    scheme: &'static str,
    generated: Option<(String, NewToken)>,
    /// Whether the chat page is served at `/`.
    chat_page: bool,
}

impl Banner {
    fn from_config(config: &Config) -> Self {
        let generated = match &config.key_source {
            KeySource::GeneratedSecret(secret) => {
                let mut token = NewToken::new("demo", Duration::from_secs(24 * 3600));
                token.iss = config.jwt_issuer.clone();
                token.aud = config.jwt_audience.clone();
                Some((secret.clone(), token))
            }
            KeySource::Secret(_) | KeySource::PublicKey => None,
        };
        Self {
            scheme: if config.tls.is_some() { "wss" } else { "ws" },
            generated,
            chat_page: config.demo_secret.is_some(),
        }
    }

    fn print(&self, addr: std::net::SocketAddr, admin: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
        // Before the listening line: whoever waits for that line knows both.
        if let Some(admin) = admin {
            println!("chorus admin listening on {admin}");
        }
        println!("chorus listening on {addr}");
        if let Some((secret, token)) = &self.generated {
            let jwt = token.sign_hs256(secret.as_bytes()).context("cannot sign the demo token")?;
            println!("no JWT key configured: made a random secret for this run");
            println!("  secret:  {secret}");
            println!("  token:   {jwt}   (sub \"demo\", valid 24h)");
            println!("  connect: {}://{addr}/ws?token={jwt}", self.scheme);
        }
        if self.chat_page {
            println!(
                "  chat:    {}://{addr}/   (open it in two browser tabs)",
                if self.scheme == "wss" { "https" } else { "http" }
            );
        }
        Ok(())
    }
}

/// SIGTERM and SIGINT, handled from the moment this exists.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
        })
    }

    /// Waits for the next SIGTERM or SIGINT.
    async fn next(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

/// Reads the TLS files again on every SIGHUP; a failed reload keeps the pair in use.
fn reload_on_sighup(tls: std::sync::Arc<chorus::tls::Tls>) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    Ok(async move {
        while hangup.recv().await.is_some() {
            match tls.reload() {
                Ok(()) => tracing::info!("SIGHUP: TLS certificate and key reloaded"),
                Err(e) => tracing::error!("SIGHUP: TLS reload failed, keeping the certificate in use: {e}"),
            }
        }
    })
}
