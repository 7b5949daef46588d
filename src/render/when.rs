//! Times for people: in the plan's zone with its abbreviation (`04:05 EST`), and how far away
//! (`in 3h12m`). Machines get RFC 3339 UTC elsewhere; every human output uses these.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

/// The plan's zone, or UTC: a time shown to people always says which zone it is in.
fn zoned(t: DateTime<Utc>, zone: Option<Tz>, format: &'static str) -> String {
    use chrono::format::{Item, StrftimeItems};
    use std::sync::{Mutex, PoisonError};
    // Each format parsed once: `status` of a large plan formats tens of thousands of times.
    static PARSED: Mutex<Vec<(&str, Vec<Item<'static>>)>> = Mutex::new(Vec::new());
    let local = t.with_timezone(&zone.unwrap_or(Tz::UTC));
    let mut parsed = PARSED.lock().unwrap_or_else(PoisonError::into_inner);
    let i = match parsed.iter().position(|(f, _)| *f == format) {
        Some(i) => i,
        None => match StrftimeItems::new(format).parse() {
            Ok(items) => {
                parsed.push((format, items));
                parsed.len() - 1
            }
            Err(_) => return local.format(format).to_string(),
        },
    };
    local.format_with_items(parsed[i].1.iter()).to_string()
}

/// `2026-12-01 04:05 EST` (seconds shown only when not zero).
#[must_use]
pub fn date_time(t: DateTime<Utc>, zone: Option<Tz>) -> String {
    use chrono::Timelike as _;
    if t.second() == 0 && t.nanosecond() == 0 {
        zoned(t, zone, "%Y-%m-%d %H:%M %Z")
    } else {
        zoned(t, zone, "%Y-%m-%d %H:%M:%S %Z")
    }
}

/// `04:05 EST` when `t` falls on the same day as `now` in the zone, else the date too.
#[must_use]
pub fn near(t: DateTime<Utc>, now: DateTime<Utc>, zone: Option<Tz>) -> String {
    let z = zone.unwrap_or(Tz::UTC);
    if t.with_timezone(&z).date_naive() == now.with_timezone(&z).date_naive() {
        use chrono::Timelike as _;
        if t.second() == 0 {
            zoned(t, zone, "%H:%M %Z")
        } else {
            zoned(t, zone, "%H:%M:%S %Z")
        }
    } else {
        date_time(t, zone)
    }
}

/// A log timestamp: `04:05:00.012 EST`.
#[must_use]
pub fn stamp(t: DateTime<Utc>, zone: Option<Tz>) -> String {
    zoned(t, zone, "%H:%M:%S%.3f %Z")
}

/// `in 3h12m`, `in 4m12s`, `in 9s`, `now`, `3m ago`, `2d4h ago`: two units at most.
#[must_use]
pub fn relative(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (t - now).num_seconds();
    if secs == 0 {
        return "now".to_owned();
    }
    let span = compact(secs.unsigned_abs());
    if secs > 0 {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

fn compact(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn times_carry_the_zone_abbreviation() {
        let toronto: Tz = "America/Toronto".parse().unwrap();
        let at = t("2026-12-01T09:05:00Z");
        assert_eq!(date_time(at, Some(toronto)), "2026-12-01 04:05 EST");
        assert_eq!(date_time(at, None), "2026-12-01 09:05 UTC");
        assert_eq!(
            near(at, t("2026-12-01T06:00:00Z"), Some(toronto)),
            "04:05 EST"
        );
        // 2026-12-01T04:00Z is still Nov 30 in Toronto: the date is shown.
        assert_eq!(
            near(at, t("2026-12-01T04:00:00Z"), Some(toronto)),
            "2026-12-01 04:05 EST"
        );
        assert_eq!(
            stamp(t("2026-07-01T09:05:00.012Z"), Some(toronto)),
            "05:05:00.012 EDT"
        );
    }

    #[test]
    fn relative_times_use_two_units() {
        let now = t("2026-12-01T00:00:00Z");
        assert_eq!(relative(t("2026-12-01T03:12:40Z"), now), "in 3h12m");
        assert_eq!(relative(t("2026-12-01T00:04:12Z"), now), "in 4m12s");
        assert_eq!(relative(t("2026-12-01T00:00:09Z"), now), "in 9s");
        assert_eq!(relative(now, now), "now");
        assert_eq!(relative(t("2026-11-30T23:57:00Z"), now), "3m0s ago");
        assert_eq!(relative(t("2026-12-03T04:00:00Z"), now), "in 2d4h");
    }
}
