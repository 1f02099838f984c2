//! Negotiating permessage-deflate in the upgrade (RFC 7692 section 5 and 7.1).
//!
//! The client lists offers in `Sec-WebSocket-Extensions`, best first; the
//! server takes the first `permessage-deflate` offer it can honour without a
//! compression window per connection, and always answers with
//! `server_no_context_takeover` and `client_no_context_takeover`. An offer
//! with an unknown, repeated or malformed parameter is declined, as the RFC
//! asks, and the next one is tried; if none fits, the connection is plain.

use super::deflate::MAX_WINDOW_BITS;

/// The token of the one extension chorus speaks.
const PERMESSAGE_DEFLATE: &str = "permessage-deflate";

/// An accepted offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// The window the client asked the server to stay within, echoed back.
    pub server_max_window_bits: Option<u8>,
}

impl Accepted {
    /// The largest payload the shared compressed frames may have for this
    /// client: deflate's window bits.
    pub fn window_bits(&self) -> u8 {
        self.server_max_window_bits.unwrap_or(MAX_WINDOW_BITS)
    }

    /// The `Sec-WebSocket-Extensions` value of the response.
    pub fn response(&self) -> String {
        let mut answer = format!("{PERMESSAGE_DEFLATE}; server_no_context_takeover; client_no_context_takeover");
        if let Some(bits) = self.server_max_window_bits {
            answer.push_str(&format!("; server_max_window_bits={bits}"));
        }
        answer
    }
}

/// The first acceptable permessage-deflate offer among the header values.
pub fn negotiate<'h>(header_values: impl IntoIterator<Item = &'h str>) -> Option<Accepted> {
    header_values.into_iter().flat_map(split_offers).find_map(|offer| accept(&offer))
}

/// Splits a header value into offers (comma-separated, quotes respected),
/// each a list of `;`-separated parts.
fn split_offers(value: &str) -> Vec<Vec<String>> {
    let mut offers = Vec::new();
    let mut parts = Vec::new();
    let mut part = String::new();
    let mut quoted = false;
    for c in value.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                part.push(c);
            }
            ';' | ',' if !quoted => {
                parts.push(std::mem::take(&mut part).trim().to_owned());
                if c == ',' {
                    offers.push(std::mem::take(&mut parts));
                }
            }
            _ => part.push(c),
        }
    }
    parts.push(part.trim().to_owned());
    offers.push(parts);
    offers
}

/// Whether one offer can be accepted, and how.
fn accept(offer: &[String]) -> Option<Accepted> {
    let (name, params) = offer.split_first()?;
    if !name.eq_ignore_ascii_case(PERMESSAGE_DEFLATE) {
        return None;
    }
    let mut seen: Vec<String> = Vec::new();
    let mut accepted = Accepted { server_max_window_bits: None };
    for param in params {
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (k.trim().to_ascii_lowercase(), Some(v.trim().trim_matches('"'))),
            None => (param.trim().to_ascii_lowercase(), None),
        };
        if seen.contains(&key) {
            return None;
        }
        match (key.as_str(), value) {
            // Both are what chorus answers anyway.
            ("server_no_context_takeover" | "client_no_context_takeover", None) => {}
            // The client can limit its window; chorus inflates with any.
            ("client_max_window_bits", None) => {}
            ("client_max_window_bits", Some(bits)) => {
                window_bits(bits)?;
            }
            // The server must stay within this window. With no context
            // takeover that holds for every message no longer than the
            // window, so the shared frames serve it (see `deflate`).
            ("server_max_window_bits", Some(bits)) => {
                accepted.server_max_window_bits = Some(window_bits(bits)?);
            }
            _ => return None,
        }
        seen.push(key);
    }
    Some(accepted)
}

/// A window size parameter: 8 to 15, digits only (RFC 7692 7.1.2).
fn window_bits(value: &str) -> Option<u8> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) || value.len() > 2 {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=MAX_WINDOW_BITS).contains(bits))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(value: &str) -> Option<Accepted> {
        negotiate([value])
    }

    const PLAIN: Option<Accepted> = Some(Accepted { server_max_window_bits: None });

    #[test]
    fn browsers_and_common_clients_are_accepted() {
        // Chromium and Firefox.
        assert_eq!(offer("permessage-deflate; client_max_window_bits"), PLAIN);
        // Python websockets.
        assert_eq!(
            offer("permessage-deflate; server_max_window_bits=12; client_max_window_bits=12"),
            Some(Accepted { server_max_window_bits: Some(12) })
        );
        assert_eq!(offer("permessage-deflate"), PLAIN);
        assert_eq!(offer("Permessage-Deflate; Server_No_Context_Takeover; client_no_context_takeover"), PLAIN);
        assert_eq!(offer("permessage-deflate; client_max_window_bits=\"10\""), PLAIN);
    }

    #[test]
    fn the_answer_turns_context_takeover_off() {
        assert_eq!(
            PLAIN.unwrap().response(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        assert_eq!(
            Accepted { server_max_window_bits: Some(10) }.response(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10"
        );
    }

    #[test]
    fn odd_offers_are_declined() {
        for value in [
            "",
            "x-webkit-deflate-frame",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; server_max_window_bits=+9",
            "permessage-deflate; client_max_window_bits=99",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; mystery",
        ] {
            assert_eq!(offer(value), None, "{value}");
        }
    }

    #[test]
    fn the_first_acceptable_offer_wins() {
        assert_eq!(
            offer("permessage-deflate; mystery, permessage-deflate; server_max_window_bits=9, permessage-deflate"),
            Some(Accepted { server_max_window_bits: Some(9) })
        );
        assert_eq!(negotiate(["foo", "permessage-deflate; client_max_window_bits"]), PLAIN);
        assert_eq!(negotiate([]), None);
    }
}
