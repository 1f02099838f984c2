//! HDR histograms in the `--json` file, so that runs of several processes
//! can be merged exactly (percentiles cannot be averaged; histograms can be
//! added). Each histogram is written in hdrhistogram's V2 deflate format,
//! the compressed interchange format of every HdrHistogram implementation,
//! then base64 (standard alphabet, padded) so that it fits in a JSON string.

use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
use serde::{Deserialize, Serialize};

use crate::stats::Hist;

/// Why a histogram could not be written or read back.
#[derive(Debug, thiserror::Error)]
pub enum HistoError {
    #[error("cannot serialize a histogram: {0}")]
    Serialize(String),
    #[error("a histogram is not valid base64: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("a histogram is not in hdrhistogram's V2 format: {0}")]
    Deserialize(String),
}

/// A histogram as base64 of its V2 deflate encoding.
pub fn encode(h: &Hist) -> Result<String, HistoError> {
    let mut buf = Vec::new();
    V2DeflateSerializer::new().serialize(h, &mut buf).map_err(|e| HistoError::Serialize(format!("{e:?}")))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(buf))
}

/// The histogram [`encode`] wrote.
pub fn decode(s: &str) -> Result<Hist, HistoError> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(s.trim())?;
    Deserializer::new()
        .deserialize(&mut std::io::Cursor::new(bytes))
        .map_err(|e| HistoError::Deserialize(format!("{e:?}")))
}

/// The run's histograms, encoded (empty strings for none).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Histograms {
    pub delivery: String,
    pub delivery_from_send: String,
    pub ack: String,
    pub connect: String,
}

impl Histograms {
    /// Encode the four histograms of a run; one that cannot be encoded is
    /// left empty (a merge then says it is missing).
    pub fn encode(delivery: &Hist, delivery_from_send: &Hist, ack: &Hist, connect: &Hist) -> Self {
        let e = |h: &Hist| encode(h).unwrap_or_default();
        Self { delivery: e(delivery), delivery_from_send: e(delivery_from_send), ack: e(ack), connect: e(connect) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_every_count() {
        let mut h = crate::stats::new_hist().unwrap();
        for v in 1..=10_000u64 {
            h.record(v * 997).unwrap();
        }
        h.record_n(HIST_MAX, 3).unwrap();
        let text = encode(&h).unwrap();
        assert!(text.len() < 40_000, "compressed: {} bytes", text.len());
        let back = decode(&text).unwrap();
        assert_eq!(back, h);
        assert_eq!(back.len(), 10_003);
        assert_eq!(back.value_at_quantile(0.5), h.value_at_quantile(0.5));
        assert_eq!(back.max(), h.max());
        // An empty histogram goes through too.
        let empty = crate::stats::new_hist().unwrap();
        assert_eq!(decode(&encode(&empty).unwrap()).unwrap().len(), 0);
    }

    const HIST_MAX: u64 = crate::stats::HIST_MAX_NS;

    #[test]
    fn merged_histograms_equal_one_histogram_of_everything() {
        let (mut a, mut b, mut all) =
            (crate::stats::new_hist().unwrap(), crate::stats::new_hist().unwrap(), crate::stats::new_hist().unwrap());
        for v in 1..=1000u64 {
            let h = if v % 3 == 0 { &mut a } else { &mut b };
            h.record(v * 1000).unwrap();
            all.record(v * 1000).unwrap();
        }
        let mut m = decode(&encode(&a).unwrap()).unwrap();
        m.add(decode(&encode(&b).unwrap()).unwrap()).unwrap();
        assert_eq!(m, all);
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(matches!(decode("not base64!"), Err(HistoError::Base64(_))));
        assert!(matches!(decode("aGVsbG8="), Err(HistoError::Deserialize(_))));
    }
}
