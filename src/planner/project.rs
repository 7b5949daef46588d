//! Walks each domain's steps in time order over its observed state, so each step's
//! before-state is what the previous steps leave, and records the operations and changes.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{
    Action, Change, ChangeAction, Connections, Plan, PlanError, PlanInput, PlanMeta, PlanProblem,
    PlannedDomain, PlannedStep, Policy, Summary,
};
use crate::attr::{Attr, Figure};
use crate::hypervisor::snapshot::{SnapshotSupport, Verdict};
use crate::hypervisor::{
    domain_xml, merged_depths, DomainId, ErrorKind, Hypervisor, NamedWant, Observation, Want,
};
use crate::plan_file::units::format_duration;
use crate::plan_file::{
    Attributes, ClockTarget, Located, PlanFile, PowerTarget, ShutdownMode, ShutdownPolicy, Step,
    TargetKind,
};
use crate::state::{
    ClockState, DomainState, LifecycleEvent, LifecycleRefusal, LifecycleRules, LiveFigures,
    PowerState,
};
use crate::uri::Uri;

/// Projects the plan over live state read through `input.connections`.
///
/// # Errors
/// [`PlanError::Problems`] for steps libvirt would refuse or domains that cannot be found,
/// [`PlanError::Libvirt`] when reading state fails.
pub fn project(input: &PlanInput<'_>) -> Result<Plan, PlanError> {
    project_selected(input, None)
}

/// Fewer steps than this are hashed as the projection asks for them (a thread costs more).
const HASH_AHEAD_FROM: usize = 64;

/// [`project`] for the domains `filter` selects (`--only` / `--exclude`): the others are not
/// planned or checked (a named domain that does not exist is no problem once excluded),
/// and the plan records the filter and the domains it left out.
///
/// # Errors
/// As [`project`]; [`PlanError::Filter`] for a filter value that matches none of the plan's
/// domains.
pub fn project_selected(
    input: &PlanInput<'_>,
    filter: Option<&crate::filter::Filter>,
) -> Result<Plan, PlanError> {
    let file = input.file;
    let filter = filter.and_then(crate::filter::Filter::non_empty);
    let mut problems = Vec::new();
    let mut pinned_warnings = Vec::new();
    let mut read = ReadAlready::default();
    // Each planned step's id is hashed on a second thread while this one waits for libvirt's
    // bulk read (validation left most unhashed); the projection then finds them hashed.
    let (steps, found) = std::thread::scope(|scope| {
        if file.steps.len() >= HASH_AHEAD_FROM {
            scope.spawn(|| file.steps.iter().for_each(|s| drop(s.id())));
        }
        look_up(input, &mut problems, &mut read)
    })?;
    let mut resolved = resolve_targets(
        input,
        steps,
        &found,
        &mut problems,
        &mut pinned_warnings,
        filter,
    );
    let selection = match filter {
        Some(filter) => Some(select(file, filter, &mut resolved)?),
        None => None,
    };

    // Group each domain's steps, in time order (steps without `at` run first). Keyed by
    // borrowed connection and UUID: cloning them per step cost more than the projection.
    let mut per_domain: PerDomain<'_> = BTreeMap::new();
    for (step, uri, id) in &resolved {
        per_domain
            .entry((uri, id.uuid.as_str()))
            .or_insert_with(|| (id, Vec::new()))
            .1
            .push(step);
    }
    for (_, steps) in per_domain.values_mut() {
        steps.sort_by_key(|s| (s.at.as_ref().map(|a| a.value), s.number));
    }

    let observed = observe(input.connections, &per_domain, read)?;
    let (mut out, projected_problems) = project_domains(input, &per_domain, observed)?;
    problems.extend(projected_problems);
    // Warnings about pinned sets first, as they were found first.
    let projected_warnings = std::mem::replace(&mut out.warnings, pinned_warnings);
    out.warnings.extend(projected_warnings);
    if !problems.is_empty() {
        problems.sort_by_key(|p| (p.pos, p.vm.clone()));
        return Err(PlanError::Problems(problems));
    }
    past_steps(input, &resolved, &mut out.warnings);

    // By time then step: each step's rank in that order, as every change and planned step of
    // a step has the step's time.
    let ranks = StepRanks::of(file);
    sort_moving_once(
        &mut out.changes,
        |c| ranks.of_step(c.step),
        ranks.len(),
        |a, b| a.vm.cmp(&b.vm),
    );
    sort_moving_once(
        &mut out.steps,
        |s| ranks.of_step(s.step),
        ranks.len(),
        |a, b| a.domain.name.cmp(&b.domain.name),
    );
    let mut summary = Summary::default();
    for c in &out.changes {
        match c.action {
            ChangeAction::Change => summary.change += 1,
            ChangeAction::Noop => summary.noop += 1,
            ChangeAction::Done => summary.done += 1,
        }
    }
    let mut seen = BTreeSet::new();
    out.warnings.retain(|w| seen.insert(w.clone()));
    place_rollouts(&resolved, &mut out.steps);
    // Each distinct connection cloned once, not once per planned step.
    let connections: BTreeSet<&Uri> = out.steps.iter().map(|s| &s.connection).collect();
    let connections: BTreeSet<Uri> = connections.into_iter().cloned().collect();
    let mut host_caps = file.host_caps.clone();
    host_caps.retain(|uri, _| connections.contains(uri));
    Ok(Plan {
        meta: PlanMeta {
            name: file.name.clone(),
            file: file.path.display().to_string(),
            sha256: file.sha256.clone(),
            timezone: file.timezone.map(|z| z.name().to_owned()),
        },
        policy: Policy {
            connections,
            host_caps,
            ..Policy::of(file)
        },
        planned_at: input.now,
        changes: out.changes,
        warnings: out.warnings,
        summary,
        steps: out.steps,
        selection,
    })
}

/// Keeps the resolved domains `filter` selects; every filter value must match one of the
/// plan's domains (resolved, or named by a step).
fn select(
    file: &PlanFile,
    filter: &crate::filter::Filter,
    resolved: &mut Resolved<'_>,
) -> Result<crate::filter::Selection, PlanError> {
    let mut known: Vec<(&str, &str)> = resolved
        .iter()
        .map(|(_, _, id)| (id.name.as_str(), id.uuid.as_str()))
        .collect();
    known.extend(
        file.steps
            .iter()
            .flat_map(|s| s.targets.iter())
            .filter(|t| t.kind == TargetKind::Domain)
            .map(|t| (t.name_or_uuid.as_str(), "")),
    );
    let unknown = filter.unknown(&known);
    if !unknown.is_empty() {
        let domains = known.iter().map(|(n, _)| (*n).to_owned()).collect();
        return Err(PlanError::Filter(
            crate::filter::FilterError::Unknown {
                unknown,
                plan: file.path.display().to_string(),
                domains,
            }
            .to_string(),
        ));
    }
    // Each resolved domain tested once (the filter's globs compiled once): the ones left out
    // are recorded, the others kept.
    let matcher = filter.matcher();
    let mut left_out_steps: Vec<crate::filter::LeftOut> = Vec::new();
    resolved.retain(|(step, _, id)| {
        let keep = matcher.selects(&id.name, &id.uuid);
        if !keep {
            left_out_steps.push(crate::filter::LeftOut {
                step: step.number,
                step_id: step.id(),
                at: step.at.as_ref().map(|a| a.value),
                vm: id.name.clone(),
                uuid: id.uuid.clone(),
            });
        }
        keep
    });
    let mut left_out: Vec<String> = left_out_steps.iter().map(|l| l.vm.clone()).collect();
    left_out.sort();
    left_out.dedup();
    Ok(crate::filter::Selection {
        filter: filter.clone(),
        left_out,
        left_out_steps,
    })
}

/// Projects each domain's steps over its observed state, in `per_domain`'s order.
fn project_domains(
    input: &PlanInput<'_>,
    per_domain: &PerDomain<'_>,
    observed: Vec<Option<Observed>>,
) -> Result<(Output, Vec<PlanProblem>), PlanError> {
    let plan_file = input.file.path.display().to_string();
    // Sized up front (a change per attribute a step sets): grown by doubling, these vectors of
    // large values were copied several times over, into freshly faulted memory.
    let planned = per_domain.values().flat_map(|(_, steps)| steps);
    let mut out = Output {
        steps: Vec::with_capacity(planned.clone().count()),
        changes: Vec::with_capacity(
            planned
                .map(|s| {
                    Attr::KEYS
                        .into_iter()
                        .filter(|a| s.attributes.has(*a))
                        .count()
                })
                .sum(),
        ),
        warnings: Vec::new(),
    };
    let mut problems = Vec::new();
    for ((key, (id, steps)), domain) in per_domain.iter().zip(observed) {
        let (uri, _) = *key;
        let Some(domain) = domain else {
            return Err(PlanError::Libvirt {
                context: format!("reading {} on {uri}", id.name),
                source: crate::hypervisor::HvError::new(
                    ErrorKind::NotFound,
                    "the domain disappeared while its state was read",
                ),
            });
        };
        let Observed {
            state,
            xml,
            snapshots,
            facts,
        } = domain;
        let ctx = DomainCtx {
            file: input.file,
            plan_file: &plan_file,
            uri,
            id,
            input,
            facts: &facts,
        };
        // What was read is moved into the state carried from step to step, not copied.
        let start = Carry {
            state,
            xml,
            snapshots,
            pending_clock: None,
            clock_notes: Vec::new(),
        };
        ctx.project(start, steps, &mut out, &mut problems);
    }
    Ok((out, problems))
}

type Resolved<'a> = Vec<(&'a Step, &'a Uri, &'a DomainId)>;

/// Each domain's steps, by connection and UUID (borrowed from [`Resolved`]).
type PerDomain<'a> = BTreeMap<(&'a Uri, &'a str), (&'a DomainId, Vec<&'a Step>)>;

/// Each step's place when the steps are ordered by time (steps without `at` first), then
/// number.
struct StepRanks(Vec<usize>);

impl StepRanks {
    fn of(file: &PlanFile) -> Self {
        let mut steps: Vec<&Step> = file.steps.iter().collect();
        steps.sort_by_key(|s| (s.at.as_ref().map(|a| a.value), s.number));
        let numbers = file.steps.iter().map(|s| s.number + 1).max().unwrap_or(0);
        let mut ranks = vec![0; numbers];
        for (rank, step) in steps.iter().enumerate() {
            ranks[step.number] = rank;
        }
        Self(ranks)
    }

    /// How many ranks there are: every rank is below this.
    fn len(&self) -> usize {
        self.0.len()
    }

    fn of_step(&self, number: usize) -> usize {
        self.0.get(number).copied().unwrap_or(0)
    }
}

/// A stable sort of `items` by `rank` (below `ranks`), then `tie` among equal ranks, that
/// moves each item about once: it orders their positions, then puts the items in that order in
/// place, one cycle of the permutation at a time. Changes and planned steps are hundreds of
/// bytes each: a sort that moves them `n log n` times spent more on copying than on comparing,
/// and taking them into a second vector made the process fault in that much fresh memory
/// (2000 domains: 2.4 MB less at the peak). The positions are counted into their ranks, and
/// only positions of one rank compared (both sorts of 2000 domains: 1.6 -> 1.1 ms with keys
/// compared, 0.75 ms counted).
fn sort_moving_once<T>(
    items: &mut [T],
    rank: impl Fn(&T) -> usize,
    ranks: usize,
    tie: impl Fn(&T, &T) -> std::cmp::Ordering,
) {
    // Where each rank's positions start, then each position in rank order.
    let mut starts = vec![0; ranks + 1];
    for item in &*items {
        starts[rank(item).min(ranks.saturating_sub(1)) + 1] += 1;
    }
    for r in 1..=ranks {
        starts[r] += starts[r - 1];
    }
    let mut order = vec![0; items.len()];
    let mut next = starts.clone();
    for (i, item) in items.iter().enumerate() {
        let r = rank(item).min(ranks.saturating_sub(1));
        order[next[r]] = i;
        next[r] += 1;
    }
    for r in 0..ranks {
        let same = &mut order[starts[r]..starts[r + 1]];
        if same.len() > 1 {
            same.sort_by(|i, j| tie(&items[*i], &items[*j]));
        }
    }
    // `order[i]` is where the item that belongs at `i` is. Along a cycle, the item that was at
    // its start travels with each swap until it reaches its own place; a position done is
    // marked by pointing at itself.
    for start in 0..order.len() {
        let mut i = start;
        loop {
            let from = order[i];
            order[i] = i;
            if from == start || from == i {
                break;
            }
            items.swap(i, from);
            i = from;
        }
    }
}

/// Resolves each `rollout` over its step's domains, in the order they were selected (as
/// written in `vms`, name order for a pattern), and gives each planned step its place.
fn place_rollouts(resolved: &Resolved<'_>, steps: &mut [PlannedStep]) {
    let mut order: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    for (step, _, id) in resolved {
        if step.rollout.is_some() {
            let list = order.entry(step.number).or_default();
            if !list.contains(&id.uuid.as_str()) {
                list.push(&id.uuid);
            }
        }
    }
    let specs: BTreeMap<usize, crate::plan_file::RolloutSpec> = resolved
        .iter()
        .filter_map(|(step, _, _)| Some((step.number, step.rollout.as_ref()?.value)))
        .collect();
    for planned in steps {
        let (Some(list), Some(spec)) = (order.get(&planned.step), specs.get(&planned.step)) else {
            continue;
        };
        if let Some(position) = list.iter().position(|u| *u == planned.domain.uuid) {
            planned.rollout = Some(super::Rollout::resolve(*spec, list.len(), position));
        }
    }
}

/// Each step with the connection it uses.
type Connected<'a> = Vec<(&'a Step, &'a Uri)>;

/// The domains the plan's names and patterns were found to be, on each connection: what
/// [`Resolved`] borrows, so a step's domain is not copied for each step that names it.
#[derive(Default)]
struct Found<'a> {
    /// Each name, with the domain it names (`None`: there is none).
    named: BTreeMap<&'a Uri, HashMap<&'a str, Option<DomainId>>>,
    /// Every domain, in name order, of the connections that `vms: {match: GLOB}` steps use.
    listings: BTreeMap<&'a Uri, Vec<DomainId>>,
}

/// Each step with its connection, and what its names were found to be: each name once per
/// connection, all of a connection's names in one bulk call, one listing per connection that
/// patterns use.
fn look_up<'a>(
    input: &PlanInput<'a>,
    problems: &mut Vec<PlanProblem>,
    read: &mut ReadAlready<'a>,
) -> Result<(Connected<'a>, Found<'a>), PlanError> {
    let file = input.file;
    // First every step's connection and names, so each connection resolves its names at once
    // (reading the domains they name in the same pass, as deeply as their steps need).
    let mut steps: Vec<(&Step, &Uri)> = Vec::with_capacity(file.steps.len());
    let mut wanted: BTreeMap<&Uri, BTreeMap<&str, (bool, bool)>> = BTreeMap::new();
    for step in &file.steps {
        let Some(uri) = input.connect_override.or(step.connection.as_ref()) else {
            problems.push(problem(file, step, step.pos, "-", "the step has no libvirt connection".to_owned(),
                "add `connection: qemu:///system` to the plan, set `connection` in virtplan.toml, or pass --connect URI"));
            continue;
        };
        if !input.connections.contains_key(uri) {
            return Err(PlanError::Libvirt {
                context: format!("step {}", step.number),
                source: crate::hypervisor::HvError::new(
                    ErrorKind::Other,
                    format!("no open connection to {uri}"),
                ),
            });
        }
        let names = wanted.entry(uri).or_default();
        let (clock, metadata) = (needs_xml(step), needs_metadata(step));
        for t in step.targets.iter().filter(|t| t.kind == TargetKind::Domain) {
            let flags = names.entry(t.name_or_uuid.as_str()).or_default();
            flags.0 |= clock;
            flags.1 |= metadata;
        }
        steps.push((step, uri));
    }
    let mut found = Found::default();
    let sets_vcpus: BTreeSet<&Uri> = steps
        .iter()
        .filter(|(s, _)| s.attributes.has(Attr::Vcpus) || s.attributes.has(Attr::MaxVcpus))
        .map(|(_, uri)| *uri)
        .collect();
    for (uri, names) in wanted {
        let hv = input.connections[uri].as_ref();
        let named = read_named(hv, uri, names, sets_vcpus.contains(uri), read)?;
        found.named.insert(uri, named);
    }
    // `vms: {match: GLOB}`: one listing per connection, in the steps' order.
    for (step, uri) in &steps {
        if found.listings.contains_key(uri) || !step.targets.iter().any(|t| t.pattern().is_some()) {
            continue;
        }
        let listed =
            input.connections[*uri]
                .list_domains()
                .map_err(|source| PlanError::Libvirt {
                    context: format!("listing the domains of {uri}"),
                    source,
                })?;
        found.listings.insert(uri, listed);
    }
    Ok((steps, found))
}

/// Resolves every step's domains from what [`look_up`] found.
fn resolve_targets<'a>(
    input: &PlanInput<'a>,
    steps: Connected<'a>,
    found: &'a Found<'a>,
    problems: &mut Vec<PlanProblem>,
    warnings: &mut Vec<String>,
    filter: Option<&crate::filter::Filter>,
) -> Resolved<'a> {
    let file = input.file;
    let matcher = filter.map(crate::filter::Filter::matcher);
    let mut resolved = Vec::with_capacity(steps.len());
    for (step, uri) in steps {
        for target in &step.targets {
            if target.pattern().is_some() {
                let listed = found.listings.get(uri).map_or(&[][..], Vec::as_slice);
                resolve_pattern(
                    input,
                    step,
                    target,
                    uri,
                    listed,
                    problems,
                    warnings,
                    &mut resolved,
                );
                continue;
            }
            match found.named.get(uri).and_then(|names| names.get(target.name_or_uuid.as_str())).and_then(Option::as_ref) {
                Some(id) => resolved.push((step, uri, id)),
                // A domain the run's filter leaves out is not looked for.
                None if matcher.as_ref().is_some_and(|m| !m.selects(&target.name_or_uuid, &target.name_or_uuid)) => {}
                None => problems.push(problem(
                    file,
                    step,
                    target.pos,
                    &target.name_or_uuid,
                    format!("no domain named `{}` on {uri}", target.name_or_uuid),
                    &format!("check the name or UUID with `virsh -c {uri} list --all`; virtplan never guesses"),
                )),
            }
        }
    }
    resolved
}

/// Resolves one `vms: {match: GLOB}` target of `step` on `uri` over `listed`, the domains of
/// `uri`: the recorded set when the lockfile has one, else every match in name order; zero
/// matches is a problem at the pattern.
#[allow(clippy::too_many_arguments)] // the resolver's own state, handed down
fn resolve_pattern<'a>(
    input: &PlanInput<'a>,
    step: &'a Step,
    target: &crate::plan_file::Target,
    uri: &'a Uri,
    listed: &'a [DomainId],
    problems: &mut Vec<PlanProblem>,
    warnings: &mut Vec<String>,
    resolved: &mut Resolved<'a>,
) {
    let file = input.file;
    let Some(pattern) = target.pattern() else {
        return;
    };
    // Once the lockfile recorded the set a pattern resolved to, that set is the
    // reviewed one: re-planning (a resume, `apply PLAN`) never widens it.
    let recorded: Vec<(String, String)> = input
        .progress
        .recorded_domains(&step.id())
        .into_iter()
        // A step of several targets: the recorded domains this pattern matched.
        .filter(|(_, vm)| step.targets.len() == 1 || pattern.matches(vm))
        .collect();
    if !recorded.is_empty() {
        pin_recorded(
            file, step, target, uri, listed, &recorded, problems, warnings, resolved,
        );
        return;
    }
    let matched: Vec<&DomainId> = listed.iter().filter(|d| pattern.matches(&d.name)).collect();
    if matched.is_empty() {
        problems.push(problem(
                file,
                step,
                target.pos,
                &target.name_or_uuid,
                format!(
                    "`vms: {{match: \"{}\"}}` matches no domain on {uri}",
                    target.name_or_uuid
                ),
                &format!("a pattern must select at least one domain; see the names with `virsh -c {uri} list --all --name`"),
            ));
    }
    resolved.extend(matched.into_iter().map(|id| (step, uri, id)));
}

/// Resolves a `vms: {match:}` target to the domains the lockfile `recorded` for its step
/// (UUID, name when recorded), found by UUID in `listed` (renamed since is fine); one that no
/// longer exists is a problem. A domain that matches now but was not recorded is a warning:
/// it is not touched.
#[allow(clippy::too_many_arguments)] // the resolver's own state, handed down
fn pin_recorded<'a>(
    file: &PlanFile,
    step: &'a Step,
    target: &crate::plan_file::Target,
    uri: &'a Uri,
    listed: &'a [DomainId],
    recorded: &[(String, String)],
    problems: &mut Vec<PlanProblem>,
    warnings: &mut Vec<String>,
    resolved: &mut Resolved<'a>,
) {
    let pattern_text = &target.name_or_uuid;
    for (uuid, vm) in recorded {
        match listed.iter().find(|d| d.uuid == *uuid) {
            Some(id) => resolved.push((step, uri, id)),
            None => problems.push(problem(
                file,
                step,
                target.pos,
                vm,
                format!(
                    "{} ({uuid}) was matched by `vms: {{match: \"{pattern_text}\"}}` and recorded in the lockfile, but no longer exists on {uri}",
                    crate::text::escape(vm)
                ),
                "the lockfile pins the set a pattern matched when the step was first applied; to start the plan over without it, move the lockfile aside (its progress is then forgotten)",
            )),
        }
    }
    for d in listed {
        if target.pattern().is_some_and(|p| p.matches(&d.name))
            && !recorded.iter().any(|(u, _)| *u == d.uuid)
        {
            warnings.push(format!(
                "{} ({}) now matches `{pattern_text}` of step {} but is not in the set the lockfile recorded for it: it is not touched (to act on it, add a step for it)",
                d.name, d.uuid, step.number
            ));
        }
    }
}

/// Resolves `names` (each with what its steps read: clock, metadata) on `uri` and reads the
/// domains they name in one pass (with the host's
/// CPUs, when `cpus`, asked at the same time: one round trip less to wait for), keeping what
/// was read in `read`; each name with the domain it resolves to.
fn read_named<'a>(
    hv: &dyn Hypervisor,
    uri: &'a Uri,
    names: BTreeMap<&'a str, (bool, bool)>,
    cpus: bool,
    read: &mut ReadAlready<'a>,
) -> Result<HashMap<&'a str, Option<DomainId>>, PlanError> {
    let wanted: Vec<NamedWant> = names
        .iter()
        .map(|(name, (clock, metadata))| NamedWant {
            name: (*name).to_owned(),
            clock: *clock,
            metadata: *metadata,
        })
        .collect();
    let wanted = &wanted[..];
    let (found, host_cpus) = std::thread::scope(|scope| {
        let host_cpus = cpus.then(|| scope.spawn(|| hv.host_cpus()));
        let found = hv.resolve_and_observe(wanted);
        let host_cpus = host_cpus.map(|h| {
            h.join().unwrap_or_else(|_| {
                Err(crate::hypervisor::HvError::new(
                    ErrorKind::Other,
                    "the thread reading the host's CPUs panicked",
                ))
            })
        });
        (found, host_cpus)
    });
    let found = found.map_err(|source| PlanError::Libvirt {
        context: format!("looking up and reading the plan's domains on {uri}"),
        source,
    })?;
    if let Some(host_cpus) = host_cpus {
        let host_cpus = host_cpus.map_err(|source| PlanError::Libvirt {
            context: format!("reading host CPUs of {uri}"),
            source,
        })?;
        read.host_cpus.insert(uri, host_cpus);
    }
    // Each domain was read as deeply as all of its names asked (as the adapter's wants ask).
    let depth: HashMap<&str, (bool, bool)> = merged_depths(wanted, &found.ids)
        .into_iter()
        .map(|(uuid, clock, metadata)| (uuid, (clock, metadata)))
        .collect();
    let domains = read.domains.entry(uri).or_default();
    for observation in found.observations {
        if let Some(&(clock, metadata)) = depth.get(observation.state.uuid.as_str()) {
            domains.push(ReadDomain {
                clock,
                metadata,
                observation,
            });
        }
    }
    Ok(names.into_keys().zip(found.ids).collect())
}

/// Reads every targeted domain: one bulk read per connection, in which the persistent XML is
/// read only where a step needs it (clock, reboot, agent check, title, description) or the domain runs (its
/// configuration figures live only there), snapshot names only for domains with snapshot steps.
fn observe(
    connections: &Connections,
    per_domain: &PerDomain<'_>,
    read: ReadAlready<'_>,
) -> Result<Vec<Option<Observed>>, PlanError> {
    let ReadAlready {
        domains: mut already,
        host_cpus: read_host_cpus,
    } = read;
    // Each domain under its connection, with its place in `per_domain`; an observation finds
    // its domain by a borrowed UUID (ordered maps of cloned keys, through which every
    // observation was moved, cost 1.3 ms at 2000 domains).
    let mut by_uri: BTreeMap<&Uri, Vec<Slot<'_>>> = BTreeMap::new();
    for (position, ((uri, uuid), (_, steps))) in per_domain.iter().enumerate() {
        let any = |f: fn(&Step) -> bool| steps.iter().any(|s| f(s));
        by_uri.entry(*uri).or_default().push(Slot {
            position,
            uuid,
            steps,
            clock: any(needs_xml),
            metadata: any(needs_metadata),
        });
    }
    // One entry per domain of `per_domain`, in its order.
    let mut result: Vec<Option<Observed>> = std::iter::repeat_with(|| None)
        .take(per_domain.len())
        .collect();
    for (uri, slots) in by_uri {
        let hv = &connections[uri];
        let libvirt = |context: String| move |source| PlanError::Libvirt { context, source };
        // Each observation goes to its domain's entry, found by UUID (borrowed, not copied).
        let index: HashMap<&str, &Slot<'_>> = slots.iter().map(|s| (s.uuid, s)).collect();
        // Domains read while resolving their names are taken as read, when that read was as
        // deep as all their steps need (a domain a pattern also selects may need more).
        for done in already.remove(uri).unwrap_or_default() {
            if let Some(slot) = index.get(done.observation.state.uuid.as_str()) {
                if (done.clock || !slot.clock) && (done.metadata || !slot.metadata) {
                    result[slot.position] = Some(Observed::new(done.observation));
                }
            }
        }
        let wants: Vec<Want> = slots
            .iter()
            .filter(|s| result[s.position].is_none())
            .map(|s| Want {
                uuid: s.uuid.to_owned(),
                clock: s.clock,
                metadata: s.metadata,
            })
            .collect();
        if !wants.is_empty() {
            let observations = hv
                .observe_wanted(&wants)
                .map_err(libvirt(format!("reading domain state on {uri}")))?;
            for observation in observations {
                if let Some(slot) = index.get(observation.state.uuid.as_str()) {
                    result[slot.position] = Some(Observed::new(observation));
                }
            }
        }
        let steps_of_uri = || slots.iter().flat_map(|s| s.steps.iter());
        // Asked of the driver only when a step changes a lifecycle action: nothing else
        // consults the rules (the `on_poweroff`/`on_reboot` phase of `project_step`).
        let lifecycle_rules = if steps_of_uri()
            .any(|s| s.attributes.has(Attr::OnPoweroff) || s.attributes.has(Attr::OnReboot))
        {
            hv.lifecycle_rules()
        } else {
            LifecycleRules::Any
        };
        let needs_host_cpus = steps_of_uri()
            .any(|s| s.attributes.has(Attr::Vcpus) || s.attributes.has(Attr::MaxVcpus));
        let host_cpus = if let Some(cpus) = read_host_cpus.get(uri) {
            Some(*cpus)
        } else if needs_host_cpus {
            Some(
                hv.host_cpus()
                    .map_err(libvirt(format!("reading host CPUs of {uri}")))?,
            )
        } else {
            None
        };
        for slot in &slots {
            let Some(obs) = result[slot.position].as_mut() else {
                continue;
            };
            obs.facts.host_cpus = host_cpus;
            obs.facts.lifecycle_rules = lifecycle_rules;
            if slot.steps.iter().any(|s| s.attributes.has(Attr::Snapshot)) {
                obs.snapshots = snapshot_names(hv.as_ref(), slot.uuid)
                    .map_err(libvirt(format!("listing snapshots of {}", obs.state.name)))?;
                obs.facts.snapshot_support = hv
                    .snapshot_support(slot.uuid)
                    .map_err(libvirt(format!("reading the disks of {}", obs.state.name)))?;
            }
        }
    }
    Ok(result)
}

/// One domain of [`PerDomain`] as [`observe`] reads it: its place there, and what its steps
/// read besides the bulk figures.
struct Slot<'p> {
    position: usize,
    uuid: &'p str,
    steps: &'p [&'p Step],
    clock: bool,
    metadata: bool,
}

/// What was read while the plan's names were resolved.
#[derive(Default)]
struct ReadAlready<'a> {
    /// The domains found on each connection, with what was read of them.
    domains: BTreeMap<&'a Uri, Vec<ReadDomain>>,
    /// The host's CPUs, for connections with vCPU steps.
    host_cpus: BTreeMap<&'a Uri, u32>,
}

/// A domain read while its names were resolved, and how deeply (clock, metadata: the
/// persistent definition was read for them).
struct ReadDomain {
    clock: bool,
    metadata: bool,
    observation: Observation,
}

/// Steps that show (and so read) a shut-off domain's title or description.
fn needs_metadata(s: &Step) -> bool {
    s.attributes.has(Attr::Title) || s.attributes.has(Attr::Description)
}

/// Steps whose projection reads the persistent XML: clock edits, and whatever depends on a
/// guest agent channel (a reboot's ladder, `clock.sync`, a `guest_agent` check).
fn needs_xml(s: &Step) -> bool {
    // Asked per step twice; `Attributes::set` would build a list each time.
    Attr::KEYS
        .into_iter()
        .any(|a| a.needs_xml() && s.attributes.has(a))
        || s.attributes
            .power
            .as_ref()
            .is_some_and(|p| p.value == PowerTarget::Reboot)
        || s.check.as_ref().is_some_and(|c| c.value.guest_agent)
}

fn snapshot_names(
    hv: &dyn Hypervisor,
    uuid: &str,
) -> Result<BTreeSet<String>, crate::hypervisor::HvError> {
    Ok(hv.snapshot_names(uuid)?.into_iter().collect())
}

struct Observed {
    state: DomainState,
    xml: Option<String>,
    snapshots: BTreeSet<String>,
    facts: Facts,
}

impl Observed {
    /// What was read of a domain; [`observe`] adds its snapshots and its host's facts.
    fn new(Observation { state, definition }: Observation) -> Self {
        Self {
            state,
            xml: definition,
            snapshots: BTreeSet::new(),
            facts: Facts {
                snapshot_support: SnapshotSupport::default(),
                host_cpus: None,
                lifecycle_rules: LifecycleRules::Any,
            },
        }
    }
}

/// What the projection consults about a domain and its host, besides the state it carries
/// from step to step.
struct Facts {
    /// Whether libvirt can snapshot the domain running / shut off (snapshot steps only).
    snapshot_support: SnapshotSupport,
    host_cpus: Option<u32>,
    /// Which `on_poweroff`/`on_reboot` values the domain's driver takes.
    lifecycle_rules: LifecycleRules,
}

#[derive(Default)]
struct Output {
    changes: Vec<Change>,
    steps: Vec<PlannedStep>,
    warnings: Vec<String>,
}

fn problem(
    file: &PlanFile,
    step: &Step,
    pos: crate::plan_file::Pos,
    vm: &str,
    message: String,
    help: &str,
) -> PlanProblem {
    PlanProblem {
        file: file.path.display().to_string(),
        pos,
        step: step.number,
        vm: vm.to_owned(),
        message,
        help: help.to_owned(),
    }
}

fn past_steps(input: &PlanInput<'_>, resolved: &Resolved<'_>, warnings: &mut Vec<String>) {
    let file = input.file;
    let mut seen = BTreeSet::new();
    for (step, _, id) in resolved {
        let Some(at) = &step.at else { continue };
        // As the executor reckons it (a grace beyond the calendar never passes).
        let deadline = crate::clock::later(at.value, file.grace);
        let deadline = file.window.map_or(deadline, |w| deadline.min(w.end));
        if deadline < input.now
            && seen.insert(step.number)
            && !input.progress.is_done(&step.id(), &id.uuid)
        {
            warnings.push(format!(
                "step {} ({}) was due at {} and its grace ({}) has passed: apply would record it as missed and not run it",
                step.number,
                id.name,
                crate::plan_file::time::show_time(at.value, file.timezone),
                format_duration(file.grace)
            ));
        }
    }
}

struct DomainCtx<'a> {
    file: &'a PlanFile,
    /// `file`'s path as shown, made once.
    plan_file: &'a str,
    uri: &'a Uri,
    id: &'a DomainId,
    input: &'a PlanInput<'a>,
    facts: &'a Facts,
}

/// Changes and actions of one step as they are worked out.
struct StepBuild<'a> {
    base: &'a DomainCtx<'a>,
    step: &'a Step,
    step_id: String,
    changes: Vec<Change>,
    actions: Vec<Action>,
}

impl StepBuild<'_> {
    fn change(
        &mut self,
        attribute: Attr,
        before: Figure,
        after: Figure,
        method: Option<String>,
        notes: Vec<String>,
    ) -> usize {
        let action = if before == after {
            ChangeAction::Noop
        } else {
            ChangeAction::Change
        };
        self.changes.push(Change {
            step: self.step.number,
            step_id: self.step_id.clone(),
            at: self.step.at.as_ref().map(|a| a.value),
            vm: self.base.id.name.clone(),
            uuid: self.base.id.uuid.clone(),
            connection: self.base.uri.clone(),
            attribute,
            before,
            after,
            action,
            method,
            notes,
            xml_diff: None,
        });
        self.changes.len() - 1
    }

    fn problem(&self, pos: crate::plan_file::Pos, message: String, help: &str) -> PlanProblem {
        problem(
            self.base.file,
            self.step,
            pos,
            &self.base.id.name,
            message,
            help,
        )
    }
}

/// A located refusal of a lifecycle pair the domain's driver does not take.
fn lifecycle_problem(b: &StepBuild, a: &Attributes, refusal: LifecycleRefusal) -> PlanProblem {
    let name = &b.base.id.name;
    match refusal {
        LifecycleRefusal::Action(event, action) => {
            let (key, wanted) = match event {
                LifecycleEvent::Poweroff => ("on_poweroff", &a.on_poweroff),
                LifecycleEvent::Reboot => ("on_reboot", &a.on_reboot),
            };
            let pos = wanted.as_ref().map_or(b.step.pos, |w| w.pos);
            b.problem(
                pos,
                format!("`{key}: {action}` is not supported by libvirt's QEMU driver, which runs {name}"),
                "QEMU domains take only `destroy` or `restart` here; use one of them",
            )
        }
        LifecycleRefusal::RebootDestroysWhilePoweroffRestarts => {
            let pos = a
                .on_reboot
                .as_ref()
                .or(a.on_poweroff.as_ref())
                .map_or(b.step.pos, |w| w.pos);
            b.problem(
                pos,
                format!("`on_reboot: destroy` with `on_poweroff: restart` is refused by libvirt's QEMU driver, which runs {name}"),
                "set `on_poweroff: destroy` in the same step, or keep `on_reboot: restart`",
            )
        }
    }
}

/// Domain-wide facts carried from step to step.
struct Carry {
    state: DomainState,
    xml: Option<String>,
    snapshots: BTreeSet<String>,
    /// A clock change waiting for a boot: (change index in output, step number).
    pending_clock: Option<usize>,
    /// Notes for clock changes, by the step number that made them, added once all steps are
    /// projected (a later step decides whether and when the change takes effect).
    clock_notes: Vec<(usize, String)>,
}

impl DomainCtx<'_> {
    /// Projects the domain's `steps` in order, from the state it was observed in (`carry`).
    fn project(
        &self,
        mut carry: Carry,
        steps: &[&Step],
        out: &mut Output,
        problems: &mut Vec<PlanProblem>,
    ) {
        let first = out.changes.len();
        for step in steps {
            let before = carry.state.clone();
            let mut b = StepBuild {
                base: self,
                step,
                step_id: step.id(),
                changes: Vec::new(),
                actions: Vec::new(),
            };
            let done = self.input.progress.is_done(&b.step_id, &self.id.uuid);
            if done {
                // The observed state already includes a done step's effect: project it on a
                // scratch copy, for display only, so it neither moves the state later steps
                // start from (a done power-off must not make a running domain look off) nor
                // is refused for the state it left behind (a done `max_memory` on a domain
                // that a later done step booted).
                // Its warnings and refusals are moot too: it already ran.
                let mut scratch = Carry {
                    state: carry.state.clone(),
                    xml: carry.xml.clone(),
                    snapshots: carry.snapshots.clone(),
                    pending_clock: None,
                    clock_notes: Vec::new(),
                };
                let _moot = self.project_step(&mut b, &mut scratch, &mut Output::default());
                b.changes
                    .iter_mut()
                    .for_each(|c| c.action = ChangeAction::Done);
                b.actions.clear();
            } else if let Err(p) = self.project_step(&mut b, &mut carry, out) {
                problems.push(p);
                continue;
            } else if let Err(p) = self.gate(&b, &carry) {
                problems.push(p);
                continue;
            }
            if let Some(last) = b.changes.last_mut() {
                if let Some(check) = &step.check {
                    last.notes.push(format!(
                        "then waits for the check: {}; the step fails if it does not pass",
                        check.value.describe()
                    ));
                }
                if step.always {
                    last.notes.push("always: runs even after an earlier step of this domain failed, was skipped or missed, or the plan was aborted".to_owned());
                }
            }
            out.steps.push(PlannedStep {
                step: step.number,
                step_id: b.step_id,
                at: step.at.as_ref().map(|a| a.value),
                domain: PlannedDomain::from(self.id.clone()),
                connection: self.uri.clone(),
                before,
                after: carry.state.clone(),
                actions: b.actions,
                done,
                reboot: step
                    .attributes
                    .power
                    .as_ref()
                    .is_some_and(|p| p.value == PowerTarget::Reboot),
                check: step.check.as_ref().map(|c| c.value.clone()),
                always: step.always,
                plan_file: self.plan_file.to_owned(),
                rollout: None,
            });
            out.changes.extend(b.changes);
        }
        if let Some(number) = carry.pending_clock {
            carry.clock_notes.push((
                number,
                "takes effect at the next boot, and no later step of this plan boots the domain"
                    .to_owned(),
            ));
            out.warnings.push(format!(
                "the clock change of {} in step {number} takes effect only at its next boot, which this plan does not include",
                self.id.name
            ));
        }
        // Only this domain's changes, appended since `first`: a scan of every change of the
        // plan per clock note made plans with many clock steps quadratic.
        for (number, note) in carry.clock_notes {
            let change = out.changes[first..]
                .iter_mut()
                .find(|c| c.step == number && c.uuid == self.id.uuid && c.attribute == Attr::Clock);
            if let Some(change) = change {
                change.notes.push(note);
            }
        }
    }

    // One phase after another, in the documented order; splitting it would scatter the order.
    #[allow(clippy::too_many_lines)]
    fn project_step(
        &self,
        b: &mut StepBuild<'_>,
        carry: &mut Carry,
        out: &mut Output,
    ) -> Result<(), PlanProblem> {
        let step = b.step;
        let a = &step.attributes;
        // Every attribute is projected below, in its phase; listed without `..` so a new
        // attribute does not compile until it has a phase here.
        let Attributes {
            power: _,
            memory: _,
            max_memory: _,
            vcpus: _,
            max_vcpus: _,
            clock: _,
            autostart: _,
            title: _,
            description: _,
            snapshot: _,
            on_poweroff: _,
            on_reboot: _,
        } = a;
        let power = a.power.as_ref().map(|p| p.value);
        settled(b, &carry.state, a.power.as_ref())?;

        // 1. Power off (or pause a running domain) before anything else.
        match power {
            Some(PowerTarget::Shutoff) => {
                let state = &mut carry.state;
                let method = state
                    .power
                    .is_active()
                    .then(|| shutdown_method(step.shutdown));
                if state.power.is_active() {
                    b.actions.push(Action::PowerOff {
                        policy: step.shutdown,
                    });
                    if step.shutdown.mode == ShutdownMode::Graceful
                        && !step.shutdown.force_after_timeout
                    {
                        out.warnings.push(format!(
                            "step {} shuts {} down gracefully with force_after_timeout: false; a guest that ignores ACPI never stops, and the step fails after {}",
                            step.number, self.id.name, format_duration(step.shutdown.timeout)
                        ));
                    }
                }
                b.change(
                    Attr::Power,
                    Figure::Power(state.power),
                    Figure::Power(PowerState::Shutoff),
                    method,
                    vec![],
                );
                state.power = PowerState::Shutoff;
                state.live = None;
            }
            Some(PowerTarget::Reboot) if carry.state.power == PowerState::Paused => {
                return Err(b.problem(
                    a.power.as_ref().map_or(step.pos, |p| p.pos),
                    format!("{} is paused at this step: a paused guest cannot shut down to reboot", self.id.name),
                    "resume it first (`power: running` in an earlier step), or power it off and on in two steps",
                ));
            }
            Some(PowerTarget::Reboot) if carry.state.power.is_active() => {
                b.actions.push(Action::PowerOff {
                    policy: step.shutdown,
                });
                if step.shutdown.mode == ShutdownMode::Graceful
                    && !step.shutdown.force_after_timeout
                {
                    out.warnings.push(format!(
                        "step {} reboots {} gracefully with force_after_timeout: false; a guest that ignores the shutdown request never stops, and the step fails after {}",
                        step.number, self.id.name, format_duration(step.shutdown.timeout)
                    ));
                }
                carry.state.power = PowerState::Shutoff;
                carry.state.live = None;
            }
            Some(PowerTarget::Paused) if carry.state.power == PowerState::Running => {
                b.actions.push(Action::Suspend);
                b.change(
                    Attr::Power,
                    Figure::Power(PowerState::Running),
                    Figure::Power(PowerState::Paused),
                    Some("suspend".into()),
                    vec![],
                );
                carry.state.power = PowerState::Paused;
            }
            _ => {}
        }

        // 2. Snapshot: after power-off (consistent), before configuration (captures the old state).
        if let Some(snap) = &a.snapshot {
            let name = &snap.value.name;
            let exists = carry.snapshots.contains(name);
            let mut notes = Vec::new();
            if exists {
                notes.push(format!("a snapshot named `{name}` exists: nothing to do"));
            } else {
                let running = carry.state.power.is_active();
                match self.facts.snapshot_support.at(running) {
                    Verdict::Possible => {}
                    Verdict::Unverified(note) => notes.push(note.clone()),
                    Verdict::Impossible { reason, help } => {
                        let when = if running { "running" } else { "shut off" };
                        return Err(b.problem(
                            snap.pos,
                            format!(
                                "libvirt cannot snapshot {} ({when} at this step): {reason}",
                                self.id.name
                            ),
                            help,
                        ));
                    }
                }
            }
            b.change(
                Attr::Snapshot,
                if exists {
                    Figure::Text(name.clone())
                } else {
                    Figure::None
                },
                Figure::Text(name.clone()),
                Some("snapshot create".into()),
                notes,
            );
            if !exists {
                b.actions.push(Action::Snapshot {
                    spec: snap.value.clone(),
                });
                carry.snapshots.insert(name.clone());
            }
        }

        // 3. Configuration.
        self.memory_steps(b, &mut carry.state)?;
        self.vcpu_steps(b, &mut carry.state, &mut out.warnings)?;
        if let Some(clock) = &a.clock {
            if clock.value.track == Some(crate::plan_file::RtcTrack::Boot)
                && self.uri.expose().starts_with("qemu")
            {
                return Err(b.problem(
                    clock.pos,
                    "QEMU refuses `track: boot` for the RTC timer (\"unsupported rtc timer track 'boot'\")".to_owned(),
                    "use `track: guest` (the guest's own time) or `track: wall` (host time) on QEMU/KVM",
                ));
            }
            if clock.value.edits_xml() {
                Self::clock_step(b, carry, clock)?;
                let has_agent = carry.xml.as_deref().is_some_and(agent_channel);
                if has_agent && !clock.value.sync && carry.state.power.is_active() {
                    if let Some(change) = b
                        .changes
                        .iter_mut()
                        .rev()
                        .find(|c| c.attribute == Attr::Clock)
                    {
                        change.notes.push("the domain has a guest agent: `sync: true` on the step that boots it sets the guest's time from the host".to_owned());
                    }
                }
            }
        }
        let state = &mut carry.state;
        if let Some(on) = &a.autostart {
            b.change(
                Attr::Autostart,
                Figure::Flag(state.autostart),
                Figure::Flag(on.value),
                Some("set autostart".into()),
                vec![],
            );
            if state.autostart != on.value {
                b.actions.push(Action::SetAutostart { on: on.value });
                state.autostart = on.value;
            }
        }
        if let Some(title) = &a.title {
            b.change(
                Attr::Title,
                Figure::Text(state.title.clone()),
                Figure::Text(title.value.clone()),
                Some("metadata".into()),
                vec![],
            );
            if state.title != title.value {
                b.actions.push(Action::SetTitle {
                    title: title.value.clone(),
                });
                state.title.clone_from(&title.value);
            }
        }
        if let Some(description) = &a.description {
            b.change(
                Attr::Description,
                Figure::Text(state.description.clone()),
                Figure::Text(description.value.clone()),
                Some("metadata".into()),
                vec![],
            );
            if state.description != description.value {
                b.actions.push(Action::SetDescription {
                    description: description.value.clone(),
                });
                state.description.clone_from(&description.value);
            }
        }
        let current = state.lifecycle.unwrap_or_default();
        let mut next = current;
        for (event, wanted) in [
            (LifecycleEvent::Poweroff, &a.on_poweroff),
            (LifecycleEvent::Reboot, &a.on_reboot),
        ] {
            if let Some(wanted) = wanted {
                next.set(event, wanted.value);
            }
        }
        if next != current {
            if let Some(refusal) = self.facts.lifecycle_rules.refusal(next) {
                return Err(lifecycle_problem(b, a, refusal));
            }
        }
        // libvirt checks each change against the other setting: change `on_reboot` first when
        // `on_poweroff` first would pass through a pair the driver refuses.
        let mut order = [
            (LifecycleEvent::Poweroff, Attr::OnPoweroff, &a.on_poweroff),
            (LifecycleEvent::Reboot, Attr::OnReboot, &a.on_reboot),
        ];
        let mut halfway = current;
        halfway.set(LifecycleEvent::Poweroff, next.on_poweroff);
        if self.facts.lifecycle_rules.refusal(halfway).is_some() {
            order.reverse();
        }
        let mut shown = Vec::new();
        for (event, attr, wanted) in order {
            let Some(wanted) = wanted else { continue };
            let before = current.get(event);
            let notes = if state.power.is_active() && before != wanted.value {
                vec![format!(
                    "the running domain keeps `{before}` until it is next started"
                )]
            } else {
                vec![]
            };
            shown.push((
                attr,
                Figure::Lifecycle(before),
                Figure::Lifecycle(wanted.value),
                notes,
            ));
            if before != wanted.value {
                b.actions.push(Action::SetLifecycle {
                    event,
                    action: wanted.value,
                });
            }
        }
        // Shown in the plan file's order whatever the order of the calls.
        shown.sort_by_key(|(attr, ..)| *attr);
        for (attr, before, after, notes) in shown {
            b.change(attr, before, after, Some("config".into()), notes);
        }
        if next != current {
            state.lifecycle = Some(next);
        }

        // 4. Power on last, so the new configuration boots.
        let before_power = carry.state.power;
        let boots = match power {
            Some(PowerTarget::Running) => match before_power {
                PowerState::Running => false,
                PowerState::Paused => {
                    b.actions.push(Action::Resume);
                    false
                }
                _ => {
                    b.actions.push(Action::Start);
                    true
                }
            },
            Some(PowerTarget::Paused) if !before_power.is_active() => {
                b.actions.extend([Action::Start, Action::Suspend]);
                true
            }
            Some(PowerTarget::Reboot) => {
                b.actions.push(Action::Start);
                true
            }
            _ => false,
        };
        if power == Some(PowerTarget::Reboot) {
            // An action, never "unchanged": it runs even though running → running.
            let was_running = b
                .actions
                .iter()
                .any(|a| matches!(a, Action::PowerOff { .. }));
            let (before, method) = if was_running {
                (
                    PowerState::Running,
                    format!(
                        "reboot: {}, then start",
                        ladder_method(step.shutdown, carry.xml.as_deref())
                    ),
                )
            } else {
                (
                    before_power,
                    "the domain is off at this step: the reboot starts it".to_owned(),
                )
            };
            let index = b.change(
                Attr::Power,
                Figure::Power(before),
                Figure::Power(PowerState::Running),
                Some(method),
                vec![],
            );
            b.changes[index].action = ChangeAction::Change;
        }
        if let Some(target) =
            power.filter(|p| !matches!(p, PowerTarget::Shutoff | PowerTarget::Reboot))
        {
            // Pausing a running domain was already recorded with the power-off phase.
            let recorded = b.changes.iter().any(|c| c.attribute == Attr::Power);
            if !recorded {
                let method = match (before_power, boots) {
                    (_, true) if target == PowerTarget::Paused => {
                        Some("start, then suspend".to_owned())
                    }
                    (_, true) => Some("start".to_owned()),
                    (PowerState::Paused, false) if target == PowerTarget::Running => {
                        Some("resume".to_owned())
                    }
                    _ => None,
                };
                b.change(
                    Attr::Power,
                    Figure::Power(before_power),
                    Figure::Power(target.as_state()),
                    method,
                    vec![],
                );
            }
            carry.state.power = target.as_state();
        }
        if boots {
            let state = &mut carry.state;
            state.power = power.map_or(state.power, PowerTarget::as_state);
            state.live = Some(LiveFigures {
                memory: state.memory,
                vcpus: state.vcpus,
            });
            if let Some(number) = carry.pending_clock.take() {
                let note = format!("takes effect when step {} boots the domain", step.number);
                carry.clock_notes.push((number, note));
            }
        }
        if a.clock.as_ref().is_some_and(|c| c.value.sync) {
            self.sync_step(b, carry)?;
        }
        Ok(())
    }

    /// `clock: {sync: true}`: needs a guest that runs after the step's changes, with an agent
    /// channel, or apply could only fail.
    fn sync_step(&self, b: &mut StepBuild<'_>, carry: &Carry) -> Result<(), PlanProblem> {
        let Some(clock) = &b.step.attributes.clock else {
            return Ok(());
        };
        let name = &self.id.name;
        if carry.state.power != PowerState::Running {
            return Err(b.problem(
                clock.pos,
                format!("`clock.sync` sets the guest's time through its agent, but {name} is {} after this step", carry.state.power),
                "put `sync: true` on the step that powers the domain on (`power: running` or `power: reboot`), or on a later step while it runs",
            ));
        }
        if !carry.xml.as_deref().is_some_and(agent_channel) {
            return Err(b.problem(
                clock.pos,
                format!("`clock.sync` needs a guest agent, and {name} has no guest agent channel"),
                "add `<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>` to the domain and run qemu-guest-agent in the guest, or drop `sync`",
            ));
        }
        b.change(
            Attr::GuestTime,
            Figure::None,
            Figure::Text("host time".to_owned()),
            Some("set through the guest agent once it answers".into()),
            vec![],
        );
        b.actions.push(Action::SyncGuestTime);
        Ok(())
    }

    /// A `check` that can never pass is refused now, not at 4 a.m.
    fn gate(&self, b: &StepBuild<'_>, carry: &Carry) -> Result<(), PlanProblem> {
        let Some(check) = &b.step.check else {
            return Ok(());
        };
        let name = &self.id.name;
        if check.value.guest_agent && !carry.xml.as_deref().is_some_and(agent_channel) {
            return Err(b.problem(
                check.pos,
                format!("the check waits for the guest agent, and {name} has no guest agent channel: it could never pass"),
                "add a guest agent channel (org.qemu.guest_agent.0) to the domain, or drop `guest_agent: true`",
            ));
        }
        if check.value.guest_agent && carry.state.power != PowerState::Running {
            return Err(b.problem(
                check.pos,
                format!("the check waits for the guest agent, but {name} is {} after this step: it could never pass", carry.state.power),
                "check the agent on a step that leaves the domain running",
            ));
        }
        if let Some(want) = check.value.state {
            if want.as_state() != carry.state.power {
                return Err(b.problem(
                    check.pos,
                    format!("the check waits for {name} to be {want}, but this step leaves it {}", carry.state.power),
                    "check for the state the step leaves (`state: running` after a power-on or reboot)",
                ));
            }
        }
        Ok(())
    }

    fn memory_steps(
        &self,
        b: &mut StepBuild<'_>,
        state: &mut DomainState,
    ) -> Result<(), PlanProblem> {
        let a = &b.step.attributes;
        let active = state.power.is_active();
        let name = &self.id.name;
        if let Some(max) = &a.max_memory {
            if active {
                return Err(b.problem(max.pos, format!("`max_memory` needs {name} off, but it is {} at this step", state.power),
                    "add `power: shutoff` to this step (power-off is applied first) or to an earlier step"));
            }
            let mut notes = vec![];
            if state.memory > max.value {
                notes.push(format!(
                    "current memory is lowered from {} to {} with it",
                    state.memory, max.value
                ));
                state.memory = max.value;
            }
            b.change(
                Attr::MaxMemory,
                Figure::Memory(state.max_memory),
                Figure::Memory(max.value),
                Some("config".into()),
                notes,
            );
            if state.max_memory != max.value {
                b.actions.push(Action::SetMaxMemory { max: max.value });
                state.max_memory = max.value;
            }
        }
        if let Some(mem) = &a.memory {
            let v = mem.value;
            let mut notes = vec![];
            if active {
                if v > state.max_memory {
                    return Err(b.problem(mem.pos,
                        format!("`memory` {v} is above the maximum {} of {name}, which is {} at this step", state.max_memory, state.power),
                        "a running domain cannot grow past its maximum: power it off in this step or an earlier one (the maximum is then raised), or raise `max_memory` while it is off"));
                }
                if state.memory != v {
                    notes.push("the live balloon target is set too; a guest without a balloon driver keeps its current size until the next boot".to_owned());
                }
            } else if v > state.max_memory {
                notes.push(format!(
                    "max memory is raised from {} to {v} first (the domain is off)",
                    state.max_memory
                ));
            }
            let method = if active { "live+config" } else { "config" };
            b.change(
                Attr::Memory,
                Figure::Memory(state.memory),
                Figure::Memory(v),
                Some(method.into()),
                notes,
            );
            if state.memory != v || (active && state.live.is_some_and(|l| l.memory != v)) {
                if !active && v > state.max_memory {
                    b.actions.push(Action::SetMaxMemory { max: v });
                    state.max_memory = v;
                }
                b.actions.push(Action::SetMemory {
                    memory: v,
                    live: active,
                });
                state.memory = v;
                if let Some(live) = state.live.as_mut() {
                    live.memory = v;
                }
            }
        }
        Ok(())
    }

    fn vcpu_steps(
        &self,
        b: &mut StepBuild<'_>,
        state: &mut DomainState,
        host_warnings: &mut Vec<String>,
    ) -> Result<(), PlanProblem> {
        let a = &b.step.attributes;
        let active = state.power.is_active();
        let name = &self.id.name;
        let host_note = |n: u32| {
            self.facts
                .host_cpus
                .filter(|h| n > *h)
                .map(|h| format!("{n} vCPUs is more than the {h} CPUs of the host"))
        };
        let mut warnings = vec![];
        if let Some(max) = &a.max_vcpus {
            if active {
                return Err(b.problem(max.pos, format!("`max_vcpus` needs {name} off, but it is {} at this step", state.power),
                    "add `power: shutoff` to this step (power-off is applied first) or to an earlier step"));
            }
            let mut notes: Vec<String> = host_note(max.value).into_iter().collect();
            warnings.extend(notes.clone());
            if state.vcpus > max.value {
                notes.push(format!(
                    "current vCPUs are lowered from {} to {} with it",
                    state.vcpus, max.value
                ));
                state.vcpus = max.value;
            }
            b.change(
                Attr::MaxVcpus,
                Figure::Count(state.max_vcpus),
                Figure::Count(max.value),
                Some("config".into()),
                notes,
            );
            if state.max_vcpus != max.value {
                b.actions.push(Action::SetMaxVcpus { max: max.value });
                state.max_vcpus = max.value;
            }
        }
        if let Some(n) = &a.vcpus {
            let v = n.value;
            let mut notes: Vec<String> = host_note(v).into_iter().collect();
            warnings.extend(notes.clone());
            if active {
                if v > state.max_vcpus {
                    return Err(b.problem(n.pos,
                        format!("`vcpus` {v} is above the maximum {} of {name}, which is {} at this step", state.max_vcpus, state.power),
                        "vCPUs can be hot-plugged only up to the maximum: power the domain off in this step or an earlier one (the maximum is then raised), or raise `max_vcpus` while it is off"));
                }
                if state.live.is_some_and(|l| v < l.vcpus) {
                    notes.push("removing vCPUs from a running guest needs the guest to release them (hot-unplug)".to_owned());
                }
            } else if v > state.max_vcpus {
                notes.push(format!(
                    "the vCPU maximum is raised from {} to {v} first (the domain is off)",
                    state.max_vcpus
                ));
            }
            let method = if active {
                "live (hotplug)+config"
            } else {
                "config"
            };
            b.change(
                Attr::Vcpus,
                Figure::Count(state.vcpus),
                Figure::Count(v),
                Some(method.into()),
                notes,
            );
            if state.vcpus != v || (active && state.live.is_some_and(|l| l.vcpus != v)) {
                if !active && v > state.max_vcpus {
                    b.actions.push(Action::SetMaxVcpus { max: v });
                    state.max_vcpus = v;
                }
                b.actions.push(Action::SetVcpus {
                    vcpus: v,
                    live: active,
                });
                state.vcpus = v;
                if let Some(live) = state.live.as_mut() {
                    live.vcpus = v;
                }
            }
        }
        host_warnings.extend(
            warnings
                .into_iter()
                .map(|w| format!("step {} ({name}): {w}", b.step.number)),
        );
        Ok(())
    }

    fn clock_step(
        b: &mut StepBuild<'_>,
        carry: &mut Carry,
        clock: &Located<ClockTarget>,
    ) -> Result<(), PlanProblem> {
        let before = carry.state.clock.clone().unwrap_or_default();
        let after = ClockState {
            offset: clock
                .value
                .offset
                .map(|o| o.as_str().to_owned())
                .or_else(|| before.offset.clone()),
            rtc_track: clock
                .value
                .track
                .map(|t| t.as_str().to_owned())
                .or_else(|| before.rtc_track.clone()),
        };
        let index = b.change(
            Attr::Clock,
            Figure::Clock(before.clone()),
            Figure::Clock(after.clone()),
            Some("persistent XML, redefined".into()),
            vec![],
        );
        if before == after {
            return Ok(());
        }
        b.actions.push(Action::SetClock { clock: clock.value });
        if let Some(xml) = &carry.xml {
            // The executor makes the same edit at 4 a.m.: if it cannot be made now, say so now.
            let new_xml =
                domain_xml::set_clock(xml, after.offset.as_deref(), after.rtc_track.as_deref())
                    .map_err(|e| {
                        b.problem(
                            clock.pos,
                            format!("the domain XML of {} cannot be edited: {e}", b.base.id.name),
                            "check the domain's definition with `virsh dumpxml --inactive`",
                        )
                    })?;
            let diff = similar::TextDiff::from_lines(xml.as_str(), new_xml.as_str())
                .unified_diff()
                .context_radius(2)
                .header("before", "after")
                .to_string();
            b.changes[index].xml_diff = Some(diff);
            carry.xml = Some(new_xml);
        }
        carry.state.clock = Some(after);
        carry.pending_clock = Some(b.step.number);
        Ok(())
    }
}

fn agent_channel(xml: &str) -> bool {
    domain_xml::has_agent_channel(xml).unwrap_or(false)
}

/// How a reboot shuts the guest down: through its agent when it has a channel, else ACPI.
fn ladder_method(p: ShutdownPolicy, xml: Option<&str>) -> String {
    if p.mode == ShutdownMode::Force {
        return shutdown_method(p);
    }
    let by = if xml.is_some_and(agent_channel) {
        "guest agent"
    } else {
        "ACPI"
    };
    format!("{by} {}", shutdown_method(p))
}

fn shutdown_method(p: ShutdownPolicy) -> String {
    match (p.mode, p.force_after_timeout) {
        (ShutdownMode::Force, _) => "force (destroy)".to_owned(),
        (ShutdownMode::Graceful, true) => format!(
            "graceful shutdown, force after {}",
            format_duration(p.timeout)
        ),
        (ShutdownMode::Graceful, false) => format!(
            "graceful shutdown, wait up to {}, never force",
            format_duration(p.timeout)
        ),
    }
}

/// A power change from a transitional state (shutting down, pmsuspended) cannot be planned.
fn settled(
    b: &StepBuild<'_>,
    state: &DomainState,
    power: Option<&Located<PowerTarget>>,
) -> Result<(), PlanProblem> {
    let Some(power) = power else { return Ok(()) };
    match state.power {
        PowerState::Running | PowerState::Paused | PowerState::Shutoff | PowerState::Crashed => {
            Ok(())
        }
        other => Err(b.problem(
            power.pos,
            format!(
                "{} is {other}; virtplan cannot plan a power change from that state",
                b.base.id.name
            ),
            "wait until the domain is running, paused or shut off, then run `virtplan plan` again",
        )),
    }
}

#[cfg(test)]
mod tests {
    /// `sort_moving_once` agrees with the standard stable sort (by key, then the tie-break,
    /// then the original order) on every length up to 40 and many orders (a fixed
    /// pseudo-random sequence).
    #[test]
    fn sort_moving_once_is_a_stable_sort() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            seed >> 33
        };
        for len in 0..=40 {
            for _ in 0..25 {
                // Keys with ties; the second field tells equal keys apart.
                let items: Vec<(u64, usize)> = (0..len).map(|i| (next() % 7, i)).collect();
                let mut expected = items.clone();
                expected.sort_by(|a, b| (a.0 / 3).cmp(&(b.0 / 3)).then(a.0.cmp(&b.0)));
                let mut sorted = items;
                super::sort_moving_once(
                    &mut sorted,
                    |x| usize::try_from(x.0 / 3).unwrap(),
                    3,
                    |a, b| a.0.cmp(&b.0),
                );
                assert_eq!(sorted, expected);
            }
        }
    }
}
