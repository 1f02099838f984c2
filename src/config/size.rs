//! Byte sizes with a unit, for flags like `--history-memory 256MiB`.
//!
//! Both decimal (`KB`, `MB`, `GB`: powers of 1000) and binary (`KiB`,
//! `MiB`, `GiB`: powers of 1024) units, case-insensitive, so that an
//! operator's `512mb` means what it says; a bare number is bytes.

/// Parses `"256MiB"`, `"64 KB"`, `"1048576"`.
pub fn parse_bytes(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: usize = number.parse().map_err(|_| format!("{text:?} is not a size such as 256MiB"))?;
    let multiplier: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "ki" | "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mi" | "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gi" | "gib" => 1 << 30,
        other => return Err(format!("unknown unit {other:?} in {text:?} (use B, KB, KiB, MB, MiB, GB or GiB)")),
    };
    number.checked_mul(multiplier).ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_decimal_and_binary() {
        assert_eq!(parse_bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_bytes("64 KB"), Ok(64_000));
        assert_eq!(parse_bytes("512mb"), Ok(512_000_000));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        for bad in ["", "MiB", "1.5MiB", "12 parsecs", "-1"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }
}
