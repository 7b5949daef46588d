//! Step and window times: local wall times in an explicit IANA zone, RFC 3339 instants, or
//! offsets from `window.start`. A plan never falls back to the machine's local zone.

use chrono::{DateTime, LocalResult, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

use super::diag::did_you_mean;
use super::units::{parse_duration, ValueError};

// The absolute time forms, as one regular expression: `YYYY-MM-DD HH:MM[:SS]` (or with `T`)
// in the plan's zone, or RFC 3339 with seconds and an offset. The validator checks this shape
// before parsing, and the JSON Schema uses the same text, so the two accept the same forms.
macro_rules! absolute_time_pattern {
    () => {
        r"[0-9]{4}-[0-9]{2}-[0-9]{2}([ T][0-9]{2}:[0-9]{2}(:[0-9]{2})?|[ Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2}))"
    };
}

/// An absolute time, anchored: `window.start`, `window.end`.
pub const INSTANT_PATTERN: &str = concat!("^", absolute_time_pattern!(), "$");

/// A step's `at`: an absolute time or `+DURATION`.
pub const AT_PATTERN: &str = concat!(r"^(\+.+|", absolute_time_pattern!(), ")$");

fn instant_shape() -> &'static regex::Regex {
    static SHAPE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    SHAPE.get_or_init(|| regex::Regex::new(INSTANT_PATTERN).expect("a valid pattern"))
}

const NAIVE_FORMATS: [&str; 4] = [
    "%Y-%m-%d %H:%M",
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%dT%H:%M:%S",
];

const TIME_HELP: &str =
    "write `YYYY-MM-DD HH:MM`, `YYYY-MM-DD HH:MM:SS`, an RFC 3339 time such as 2026-12-01T04:00:00-05:00, or `+DURATION` from window.start";

/// Parses an IANA zone name such as `America/Toronto`.
///
/// # Errors
/// When the name is not in the IANA database, with a close match when there is one.
pub fn parse_zone(text: &str) -> Result<Tz, ValueError> {
    text.parse::<Tz>().map_err(|_| {
        let lower = text.to_ascii_lowercase();
        let close = chrono_tz::TZ_VARIANTS
            .iter()
            .map(|tz| tz.name())
            .find(|name| name.to_ascii_lowercase() == lower);
        let names: Vec<&str> = chrono_tz::TZ_VARIANTS.iter().map(|tz| tz.name()).collect();
        let help = match (close, did_you_mean(text, &names)) {
            (Some(name), _) => format!("zone names are case-sensitive: write `{name}`"),
            (None, Some(name)) => format!("did you mean `{name}`?"),
            (None, None) => {
                "use a zone name such as America/Toronto, Europe/Paris or UTC".to_owned()
            }
        };
        ValueError {
            message: format!("`{text}` is not an IANA time zone"),
            help,
        }
    })
}

/// Parses an absolute time (no `+DURATION`).
///
/// # Errors
/// When the text is no supported form, has no offset and no zone is known, or names a local
/// time that does not exist or happens twice in `zone` (a DST change).
pub fn parse_instant(text: &str, zone: Option<Tz>) -> Result<DateTime<Utc>, ValueError> {
    let text = text.trim();
    let naive = if let Some(naive) = plain_local_time(text) {
        naive
    } else {
        // The shape first: chrono alone would also take `4:20` for `04:20`, which the
        // schema (and the contract's `HH:MM`) does not.
        if !instant_shape().is_match(text) {
            return Err(ValueError {
                message: format!("`{text}` is not a time"),
                help: TIME_HELP.to_owned(),
            });
        }
        if let Ok(t) = DateTime::parse_from_rfc3339(text) {
            return Ok(t.with_timezone(&Utc));
        }
        NAIVE_FORMATS
            .iter()
            .find_map(|f| NaiveDateTime::parse_from_str(text, f).ok())
            .ok_or_else(|| ValueError {
                message: format!("`{text}` is not a time"),
                help: TIME_HELP.to_owned(),
            })?
    };
    let Some(zone) = zone else {
        return Err(ValueError {
            message: format!("time `{text}` has no UTC offset and no time zone is set"),
            help: "add `timezone: Area/City` (an IANA name) to the plan or virtplan.toml, or write an offset such as 2026-12-01T04:00:00-05:00; virtplan never assumes this machine's zone".to_owned(),
        });
    };
    match zone.from_local_datetime(&naive) {
        LocalResult::Single(t) => Ok(t.with_timezone(&Utc)),
        LocalResult::None => Err(ValueError {
            message: format!(
                "`{text}` does not exist in {zone}: the clocks skip it (daylight saving time starts)"
            ),
            help: "pick a time outside the skipped hour, or write an explicit UTC offset".to_owned(),
        }),
        LocalResult::Ambiguous(early, late) => Err(ValueError {
            message: format!(
                "`{text}` happens twice in {zone}: the clocks go back (daylight saving time ends)"
            ),
            help: format!(
                "write an explicit offset: `{}` (first) or `{}` (second)",
                early.format("%Y-%m-%dT%H:%M:%S%:z"),
                late.format("%Y-%m-%dT%H:%M:%S%:z")
            ),
        }),
    }
}

/// `YYYY-MM-DD HH:MM` or `YYYY-MM-DD HH:MM:SS` (or with `T`), the form most steps are written
/// in, read digit by digit; `None` for any other text or a date or time that does not exist,
/// which then takes the general path (shape, RFC 3339, chrono's formats) and its messages.
/// Read directly because the general path cost a thousand instructions per step, a tenth of
/// loading a large plan.
fn plain_local_time(text: &str) -> Option<NaiveDateTime> {
    let b = text.as_bytes();
    let seconds = match b.len() {
        16 => false,
        19 => true,
        _ => return None,
    };
    let number = |from: usize, to: usize| -> Option<u32> {
        b[from..to].iter().try_fold(0, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    };
    let separators = b[4] == b'-'
        && b[7] == b'-'
        && matches!(b[10], b' ' | b'T')
        && b[13] == b':'
        && (!seconds || b[16] == b':');
    if !separators {
        return None;
    }
    let year = i32::try_from(number(0, 4)?).ok()?;
    let second = if seconds { number(17, 19)? } else { 0 };
    chrono::NaiveDate::from_ymd_opt(year, number(5, 7)?, number(8, 10)?)?.and_hms_opt(
        number(11, 13)?,
        number(14, 16)?,
        second,
    )
}

/// Parses a step's `at`: an absolute time, or `+DURATION` after `window_start`.
///
/// # Errors
/// As [`parse_instant`], and a relative time without a window.
pub fn parse_at(
    text: &str,
    zone: Option<Tz>,
    window_start: Option<DateTime<Utc>>,
) -> Result<DateTime<Utc>, ValueError> {
    let Some(relative) = text.trim().strip_prefix('+') else {
        return parse_instant(text, zone);
    };
    let Some(start) = window_start else {
        return Err(ValueError {
            message: format!("relative time `{text}` needs a `window` to count from"),
            help: "add `window: {start: ..., end: ...}` to the plan, or write an absolute time"
                .to_owned(),
        });
    };
    let offset = parse_duration(relative)?;
    chrono::Duration::from_std(offset)
        .ok()
        .and_then(|d| start.checked_add_signed(d))
        .ok_or_else(|| ValueError {
            message: format!("relative time `{text}` is too far in the future"),
            help: "use an offset shorter than the window".to_owned(),
        })
}

/// A time as the plan's readers wrote it: in the plan's zone when it has one, else UTC.
#[must_use]
pub fn show_time(t: DateTime<Utc>, zone: Option<Tz>) -> String {
    zone.map_or_else(
        || t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        |z| {
            t.with_timezone(&z)
                .format("%Y-%m-%d %H:%M:%S %Z")
                .to_string()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const TORONTO: Option<Tz> = Some(chrono_tz::America::Toronto);

    /// The schema's pattern and the validator accept the same forms: every combination of
    /// separator, hour digits, seconds, fraction and offset (regression, issue 9: the schema
    /// took `2027-11-07 01:30-05:00` and refused `2026-12-01 4:20`; the validator the reverse).
    #[test]
    fn schema_pattern_and_validator_accept_the_same_forms() {
        let shape = regex::Regex::new(INSTANT_PATTERN).unwrap();
        let mut accepted = 0;
        let mut checked = 0;
        for sep in [" ", "T", "t", "_", "  "] {
            for hm in ["04:20", "4:20", "04:2", "0420"] {
                for sec in ["", ":30", ":30.5", ":3"] {
                    for off in ["", "Z", "z", "-05:00", "+01:30", "-0500", "+05", " UTC"] {
                        let text = format!("2027-11-07{sep}{hm}{sec}{off}");
                        let schema = shape.is_match(&text);
                        let validator = parse_instant(&text, Some(Tz::UTC)).is_ok();
                        assert_eq!(schema, validator, "{text:?}");
                        checked += 1;
                        accepted += usize::from(validator);
                    }
                }
            }
        }
        // Not vacuous: both sides accept a good share and refuse the rest.
        assert!(
            accepted >= 10 && accepted < checked / 2,
            "{accepted} of {checked}"
        );
        assert!(parse_instant("2027-11-07 01:30-05:00", Some(Tz::UTC)).is_err());
        assert!(parse_instant("2026-12-01 4:20", Some(Tz::UTC)).is_err());
        assert!(shape.is_match("2027-11-07T01:30:00-05:00"));
    }

    /// The direct reading of `YYYY-MM-DD HH:MM[:SS]` agrees with chrono's formats, and leaves
    /// whatever it does not take (impossible dates, leap seconds, other forms) to them.
    #[test]
    fn plain_local_times_read_as_chrono_reads_them() {
        let chrono_reads = |text: &str| {
            NAIVE_FORMATS
                .iter()
                .find_map(|f| NaiveDateTime::parse_from_str(text, f).ok())
        };
        let mut taken = 0;
        for date in [
            "2026-12-01",
            "0000-01-01",
            "9999-12-31",
            "2028-02-29",
            "2026-02-29",
            "2026-13-01",
            "2026-00-10",
            "2026-04-31",
        ] {
            for sep in [" ", "T", "t", "_"] {
                for time in [
                    "04:00", "23:59", "00:00:00", "23:59:59", "23:59:60", "24:00", "04:60", "4:00",
                    "04:0a", "04:00:5",
                ] {
                    let text = format!("{date}{sep}{time}");
                    if let Some(t) = plain_local_time(&text) {
                        // What the general path would take too, as the same time.
                        assert!(instant_shape().is_match(&text), "{text:?}");
                        assert_eq!(Some(t), chrono_reads(&text), "{text:?}");
                        taken += 1;
                    }
                }
            }
        }
        assert!(taken >= 20, "{taken}");
    }

    #[test]
    fn local_times_use_the_plan_zone() {
        let t = parse_instant("2026-12-01 04:00", TORONTO).unwrap();
        assert_eq!(t.to_rfc3339(), "2026-12-01T09:00:00+00:00");
        let t = parse_instant("2026-12-01 04:00:30", TORONTO).unwrap();
        assert_eq!(t.to_rfc3339(), "2026-12-01T09:00:30+00:00");
    }

    #[test]
    fn offsets_win_over_the_zone() {
        let t = parse_instant("2026-12-01T04:00:00+01:00", TORONTO).unwrap();
        assert_eq!(t.to_rfc3339(), "2026-12-01T03:00:00+00:00");
    }

    #[test]
    fn dst_gaps_and_folds_are_errors() {
        let gap = parse_instant("2026-03-08 02:30", TORONTO).unwrap_err();
        assert!(gap.message.contains("does not exist"), "{gap:?}");
        let fold = parse_instant("2026-11-01 01:30", TORONTO).unwrap_err();
        assert!(
            fold.help.contains("-04:00") && fold.help.contains("-05:00"),
            "{fold:?}"
        );
    }

    #[test]
    fn naive_time_without_zone_is_refused() {
        assert!(parse_instant("2026-12-01 04:00", None).is_err());
    }

    #[test]
    fn relative_times_count_from_the_window() {
        let start = parse_instant("2026-12-01 04:00", TORONTO).unwrap();
        let t = parse_at("+5m", None, Some(start)).unwrap();
        assert_eq!((t - start).num_minutes(), 5);
        assert!(parse_at("+5m", None, None).is_err());
    }
}
