//! `--only VM` / `--exclude VM` for `plan` and `apply`: which of a plan's domains one run acts
//! on, like terraform's `-target` / `-exclude`. Each is repeatable; a value is a domain's name,
//! its UUID, or a glob over names (`web-*`, `web-0[1-3]`, the syntax of `vms: {match:}`).
//! A domain is selected when `--only` is absent or one of its values matches it, and no
//! `--exclude` value does. A value that matches none of the plan's domains is an error (a typo
//! must not silently select nothing, or everything). The filter is shown by `plan`, kept in a
//! saved plan, and recorded in the lockfile by `apply`.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// A run's domain filter, as given on the command line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Filter {
    /// `--only` values: act only on the domains one of them matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub only: Vec<String>,
    /// `--exclude` values: leave out the domains one of them matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
}

/// Why a filter was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("--{flag} {value}: not a valid pattern ({reason}); give a domain's name, its UUID, or a glob such as 'web-*' (`*` any run, `?` one character, `[abc]`, `[!abc]`)")]
    Pattern {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error("{}", unknown_message(.unknown, .plan, .domains))]
    Unknown {
        /// The flags and values that match nothing.
        unknown: Vec<(&'static str, String)>,
        plan: String,
        /// The plan's domain names, for the hint.
        domains: Vec<String>,
    },
}

fn unknown_message(unknown: &[(&'static str, String)], plan: &str, domains: &[String]) -> String {
    const SHOWN: usize = 12;
    let values: Vec<String> = unknown
        .iter()
        .map(|(flag, value)| format!("--{flag} {}", quote(value)))
        .collect();
    let mut names: Vec<&str> = domains.iter().map(String::as_str).collect();
    names.sort_unstable();
    names.dedup();
    let more = names.len().saturating_sub(SHOWN);
    let mut listed = names
        .iter()
        .take(SHOWN)
        .map(|n| crate::text::escape(n))
        .collect::<Vec<_>>()
        .join(", ");
    if more > 0 {
        let _ = write!(listed, " and {more} more");
    }
    format!(
        "{} {} no domain of {plan}; its domains are: {listed}. Check the spelling (a value is a domain's name, its UUID, or a glob such as 'web-*'); `virtplan plan {plan}` lists every domain it acts on",
        values.join(", "),
        if values.len() == 1 { "matches" } else { "match" }
    )
}

/// `value` as an operator would type it in a shell: quoted when it holds glob or shell
/// characters.
fn quote(value: &str) -> String {
    let plain = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.:/@+=".contains(c));
    if plain {
        value.to_owned()
    } else {
        format!("'{}'", crate::text::escape(value).replace('\'', "'\\''"))
    }
}

impl Filter {
    /// The filter `--only` and `--exclude` give, each value checked.
    ///
    /// # Errors
    /// A value that is not a valid glob (`web-[`).
    pub fn new(only: Vec<String>, exclude: Vec<String>) -> Result<Self, FilterError> {
        for (flag, values) in [("only", &only), ("exclude", &exclude)] {
            for value in values {
                if let Err(e) = glob::Pattern::new(value) {
                    return Err(FilterError::Pattern {
                        flag,
                        value: value.clone(),
                        reason: e.msg.to_owned(),
                    });
                }
            }
        }
        Ok(Self { only, exclude })
    }

    /// Whether the filter selects every domain (no `--only`, no `--exclude`).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.only.is_empty() && self.exclude.is_empty()
    }

    /// The filter with each value's glob compiled once, to test many domains (the planner
    /// tests every resolved domain of a plan).
    #[must_use]
    pub fn matcher(&self) -> Matcher<'_> {
        Matcher {
            only: self.only.iter().map(|v| Value::of(v)).collect(),
            exclude: self.exclude.iter().map(|v| Value::of(v)).collect(),
        }
    }

    /// Whether the domain `name` (with `uuid`, when known) is one this run acts on.
    #[must_use]
    pub fn selects(&self, name: &str, uuid: &str) -> bool {
        self.matcher().selects(name, uuid)
    }

    /// The values that match none of `domains` (name, UUID), with their flags.
    #[must_use]
    pub fn unknown(&self, domains: &[(&str, &str)]) -> Vec<(&'static str, String)> {
        let m = self.matcher();
        let flags = [("only", &m.only), ("exclude", &m.exclude)];
        flags
            .into_iter()
            .flat_map(|(flag, values)| values.iter().map(move |v| (flag, v)))
            .filter(|(_, v)| !domains.iter().any(|(n, u)| v.matches(n, u)))
            .map(|(flag, v)| (flag, v.text.to_owned()))
            .collect()
    }

    /// The filter as flags: `--only web-01 --exclude 'db-*'`, or `no filter`.
    #[must_use]
    pub fn describe(&self) -> String {
        if self.is_empty() {
            return "no --only/--exclude filter".to_owned();
        }
        let flags = [("only", &self.only), ("exclude", &self.exclude)];
        flags
            .into_iter()
            .flat_map(|(flag, values)| values.iter().map(move |v| format!("--{flag} {}", quote(v))))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// `Some(self)` unless it selects everything.
    #[must_use]
    pub fn non_empty(&self) -> Option<&Self> {
        (!self.is_empty()).then_some(self)
    }
}

/// A [`Filter`] ready to test many domains ([`Filter::matcher`]).
#[derive(Debug)]
pub struct Matcher<'f> {
    only: Vec<Value<'f>>,
    exclude: Vec<Value<'f>>,
}

impl Matcher<'_> {
    /// Whether the domain `name` (with `uuid`, when known) is one this run acts on.
    #[must_use]
    pub fn selects(&self, name: &str, uuid: &str) -> bool {
        (self.only.is_empty() || self.only.iter().any(|v| v.matches(name, uuid)))
            && !self.exclude.iter().any(|v| v.matches(name, uuid))
    }
}

/// One `--only` / `--exclude` value: a domain's name, its UUID, or a glob over names.
#[derive(Debug)]
struct Value<'f> {
    text: &'f str,
    /// `None` when the text is no valid glob (refused by [`Filter::new`]; a deserialized
    /// filter may still hold one).
    glob: Option<glob::Pattern>,
}

impl<'f> Value<'f> {
    fn of(text: &'f str) -> Self {
        Self {
            text,
            glob: glob::Pattern::new(text).ok(),
        }
    }

    fn matches(&self, name: &str, uuid: &str) -> bool {
        self.text == name
            || (!uuid.is_empty() && self.text.eq_ignore_ascii_case(uuid))
            || self.glob.as_ref().is_some_and(|p| p.matches(name))
    }
}

/// What the planner did with a run's filter: the filter, and the plan's domains it left out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Selection {
    #[serde(flatten)]
    pub filter: Filter,
    /// Domains the plan's steps target that this run leaves out, in name order.
    pub left_out: Vec<String>,
    /// Each step on each domain left out: `apply` records them `pending`, so the lockfile keeps
    /// the whole set a `vms: {match:}` step resolved to.
    #[serde(default)]
    pub left_out_steps: Vec<LeftOut>,
}

/// One step on one domain that a filter left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LeftOut {
    /// 1-based step number in the plan file.
    pub step: usize,
    pub step_id: String,
    pub at: Option<chrono::DateTime<chrono::Utc>>,
    pub vm: String,
    pub uuid: String,
}

impl Selection {
    /// One line for `plan` and `apply`: the filter and what it leaves out.
    #[must_use]
    pub fn describe(&self) -> String {
        const SHOWN: usize = 12;
        let left_out = if self.left_out.is_empty() {
            "it leaves none of the plan's domains out".to_owned()
        } else {
            let mut names = self
                .left_out
                .iter()
                .take(SHOWN)
                .map(|n| crate::text::escape(n))
                .collect::<Vec<_>>()
                .join(", ");
            let more = self.left_out.len().saturating_sub(SHOWN);
            if more > 0 {
                let _ = write!(names, " and {more} more");
            }
            format!(
                "{} of the plan's domains left out, not planned or run: {names}",
                self.left_out.len()
            )
        };
        format!("Filter {}: {left_out}.", self.filter.describe())
    }
}

/// How a run's filter differs from the one the lockfile recorded for the last apply: `None`
/// when they are the same.
#[must_use]
pub fn change_note(recorded: Option<&Filter>, now: Option<&Filter>) -> Option<String> {
    let empty = Filter::default();
    let (was, is) = (recorded.unwrap_or(&empty), now.unwrap_or(&empty));
    (was != is).then(|| {
        format!(
            "the last apply of this plan ran with {}; this run has {}: steps of domains it selects run (done ones are not repeated), the others are left as recorded",
            was.describe(),
            is.describe()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(only: &[&str], exclude: &[&str]) -> Filter {
        Filter::new(
            only.iter().map(|s| (*s).to_owned()).collect(),
            exclude.iter().map(|s| (*s).to_owned()).collect(),
        )
        .unwrap()
    }

    const U1: &str = "6f1c7b1e-0000-4000-8000-000000000001";

    #[test]
    fn only_and_exclude_select_by_name_uuid_or_glob() {
        assert!(f(&[], &[]).selects("web-01", U1));
        assert!(f(&["web-01"], &[]).selects("web-01", U1));
        assert!(!f(&["web-01"], &[]).selects("web-02", ""));
        assert!(f(&[&U1.to_uppercase()], &[]).selects("anything", U1));
        assert!(f(&["web-*"], &["web-02"]).selects("web-01", ""));
        assert!(!f(&["web-*"], &["web-02"]).selects("web-02", ""));
        assert!(!f(&[], &["db-?"]).selects("db-1", ""));
        assert!(f(&[], &["db-?"]).selects("db-10", ""));
    }

    #[test]
    fn a_value_matching_no_domain_is_reported_with_its_flag() {
        let filter = f(&["web-01", "web-9"], &["db-*"]);
        let unknown = filter.unknown(&[("web-01", U1), ("web-02", "")]);
        assert_eq!(
            unknown,
            [("only", "web-9".to_owned()), ("exclude", "db-*".to_owned())]
        );
        let e = FilterError::Unknown {
            unknown,
            plan: "plan.yaml".to_owned(),
            domains: vec!["web-02".to_owned(), "web-01".to_owned()],
        }
        .to_string();
        assert!(
            e.starts_with("--only web-9, --exclude 'db-*' match no domain of plan.yaml; its domains are: web-01, web-02."),
            "{e}"
        );
        assert!(e.contains("virtplan plan plan.yaml"), "{e}");
    }

    #[test]
    fn a_malformed_glob_is_refused_naming_its_flag() {
        let e = Filter::new(vec![], vec!["web-[".to_owned()])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--exclude web-[: not a valid pattern"), "{e}");
    }

    #[test]
    fn a_changed_filter_is_explained() {
        assert_eq!(change_note(None, Some(&Filter::default())), None);
        let note = change_note(Some(&f(&["web-01"], &[])), None).unwrap();
        assert!(
            note.starts_with("the last apply of this plan ran with --only web-01; this run has no --only/--exclude filter"),
            "{note}"
        );
    }
}
