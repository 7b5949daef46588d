//! Sizes and durations, parsed by well-kept crates (`byte-unit`, `humantime`), with messages that
//! say how to write the value correctly.

use std::time::Duration;

use byte_unit::{Byte, Unit};

use crate::state::Kib;

/// A parse failure: what is wrong and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueError {
    pub message: String,
    pub help: String,
}

impl ValueError {
    fn new(message: impl Into<String>, help: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            help: help.into(),
        }
    }
}

const SIZE_HELP: &str = "write a number with a binary unit, such as 512MiB, 3GiB or 1TiB";

/// Parses a memory size such as `512MiB` or `3GiB` into whole KiB.
///
/// Binary units only: `3GB` (decimal) is refused rather than silently rounded, because libvirt
/// counts in KiB and operators who write GB almost always mean GiB. A bare number is refused
/// with a suggestion, since `3072` could be KiB, MiB or bytes.
///
/// # Errors
/// A message and a hint when the text is not a size in a binary unit or not a whole KiB.
pub fn parse_size(text: &str) -> Result<Kib, ValueError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit = unit.trim();
    if number.is_empty() {
        return Err(ValueError::new(
            format!("`{text}` is not a size"),
            SIZE_HELP,
        ));
    }
    if unit.is_empty() {
        return Err(ValueError::new(
            format!("size `{text}` has no unit"),
            format!(
                "a bare number is ambiguous; write the unit, such as `{number}MiB`, or `{number}KiB` if it is a number virsh printed (virsh counts in KiB)"
            ),
        ));
    }
    let parsed_unit = Unit::parse_str(unit, false, true).map_err(|_| {
        ValueError::new(format!("unknown size unit `{unit}` in `{text}`"), SIZE_HELP)
    })?;
    if parsed_unit.is_bit() {
        return Err(ValueError::new(
            format!("`{text}` is in bits; memory is measured in bytes"),
            SIZE_HELP,
        ));
    }
    if !parsed_unit.is_binary_multiples() && parsed_unit != Unit::B {
        let binary = format!("{}i{}", &unit[..1].to_ascii_uppercase(), "B");
        return Err(ValueError::new(
            format!("`{text}` uses a decimal unit ({unit})"),
            format!("libvirt counts memory in binary units: write `{number}{binary}`"),
        ));
    }
    let bytes = Byte::parse_str(text, false)
        .ok()
        .and_then(Byte::as_u64_checked)
        .ok_or_else(|| ValueError::new(format!("size `{text}` is too large"), SIZE_HELP))?;
    if bytes == 0 {
        return Err(ValueError::new(
            format!("size `{text}` is zero"),
            "a domain needs some memory; write a positive size such as 512MiB",
        ));
    }
    if bytes % 1024 != 0 {
        return Err(ValueError::new(
            format!("size `{text}` is not a whole number of KiB"),
            "libvirt sets memory in KiB; round to a whole KiB, MiB or GiB",
        ));
    }
    Ok(Kib(bytes / 1024))
}

const DURATION_HELP: &str = "write a number with a unit, such as 90s, 5m or 1h30m";

/// Parses a duration such as `120s`, `5m` or `1h30m`.
///
/// # Errors
/// A message and a hint when the text is not a duration with a unit.
pub fn parse_duration(text: &str) -> Result<Duration, ValueError> {
    let text = text.trim();
    if !text.is_empty() && text.chars().all(|c| c.is_ascii_digit()) {
        return Err(ValueError::new(
            format!("duration `{text}` has no unit"),
            format!("write `{text}s` for seconds or `{text}m` for minutes"),
        ));
    }
    let duration = humantime::parse_duration(text).map_err(|e| {
        // humantime's own wording ("expected number at 0") speaks of byte offsets; say it plainly.
        let why = match e {
            humantime::DurationError::UnknownUnit { unit, .. } if !unit.is_empty() => {
                format!(": unknown unit `{unit}`")
            }
            humantime::DurationError::NumberOverflow => ": the number is too large".to_owned(),
            _ => String::new(),
        };
        ValueError::new(format!("`{text}` is not a duration{why}"), DURATION_HELP)
    })?;
    if duration > MAX_DURATION {
        return Err(ValueError::new(
            format!("duration `{text}` is longer than 7 days"),
            "no maintenance step waits, times out or is late by more than a week; a larger value is almost certainly a typo (and would overflow time arithmetic)",
        ));
    }
    Ok(duration)
}

/// The longest duration a plan or virtplan.toml may give (grace, timeouts, offsets).
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The short human form of a duration (`5m`, `2m 30s`), as `humantime` prints it.
#[must_use]
pub fn format_duration(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regression_huge_shutdown_timeout_accepted() {
        let err = parse_duration("18446744073709551615s").unwrap_err();
        assert!(
            err.message.contains("longer than 7 days"),
            "{}",
            err.message
        );
        assert!(parse_duration("8d").is_err());
        assert_eq!(parse_duration("7d"), Ok(MAX_DURATION));
    }

    #[test]
    fn sizes_in_binary_units_become_kib() {
        assert_eq!(parse_size("512MiB"), Ok(Kib(512 * 1024)));
        assert_eq!(parse_size("3GiB"), Ok(Kib(3 * 1024 * 1024)));
        assert_eq!(parse_size("1.5GiB"), Ok(Kib(1536 * 1024)));
        assert_eq!(parse_size("2048KiB"), Ok(Kib(2048)));
    }

    #[test]
    fn bare_numbers_and_decimal_units_are_refused_with_a_suggestion() {
        let err = parse_size("3072").unwrap_err();
        assert!(err.help.contains("3072MiB"), "{err:?}");
        let err = parse_size("3GB").unwrap_err();
        assert!(err.help.contains("3GiB"), "{err:?}");
        assert!(parse_size("3Gb").is_err());
        assert!(parse_size("0MiB").is_err());
        assert!(parse_size("1000B").is_err());
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("120s"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("300").unwrap_err().help.contains("300s"));
        assert!(parse_duration("soon").is_err());
    }
}
