//! Log output: text for people, or one JSON object per line for log
//! pipelines (`--log-format json`, PROTOCOL.md section 10), and the rule
//! that no token ever reaches a log line.
//!
//! Failed requests are logged at `debug` (a connection storm of refusals at
//! `info` would drown everything else): with the connection's id and `sub`
//! where known. Their messages pass through [`redact`], since an error may
//! quote what the client sent.

use std::borrow::Cow;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Sends `tracing` events to stderr in `format`, filtered by `RUST_LOG`
/// (default `info`).
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        // `timestamp`, `level`, `target`, `message` and the event's fields, flat.
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).with_span_list(false).init(),
    }
}

/// `text` with anything shaped like a JWT (three base64url parts joined by
/// dots, the first one a JSON object's encoding) replaced by `[redacted]`.
pub fn redact(text: &str) -> Cow<'_, str> {
    if !text.contains("eyJ") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("eyJ") {
        out.push_str(&rest[..start]);
        let candidate = &rest[start..];
        let len = candidate
            .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '=')))
            .unwrap_or(candidate.len());
        let token = &candidate[..len];
        if token.matches('.').count() >= 2 {
            out.push_str("[redacted]");
        } else {
            out.push_str(token);
        }
        rest = &candidate[len..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_redacted_and_other_text_kept() {
        assert_eq!(redact("nothing here"), "nothing here");
        assert_eq!(redact("bad eyJhbGci.eyJzdWIi.c2ln-_x end"), "bad [redacted] end");
        assert_eq!(redact("\"eyJa.b.c\" and eyJnot-a-token"), "\"[redacted]\" and eyJnot-a-token");
    }
}
