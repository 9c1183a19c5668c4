//! The CronJob controller: starts a CronJob's Jobs on its schedule, in the shape of
//! kube-controller-manager's (v2) CronJob controller.
//!
//! The schedule is the standard five fields (minute, hour, day of month, month, day of week,
//! a restricted day of month and day of week both counting, as in Vixie cron) or a macro
//! (`@yearly`/`@annually`, `@monthly`, `@weekly`, `@daily`/`@midnight`, `@hourly`,
//! `@every <duration>`), read in `spec.timeZone` (an IANA name) or else cloudcore's local time
//! zone. `TZ=`/`CRON_TZ=` in the schedule is refused, as kube-apiserver refuses it
//! ([`validate`]).
//!
//! Each reconcile reads the CronJob and the Jobs it controls from the API, then:
//! 1. brings `status.active` up to date (`SawCompletedJob`, `MissingJob`) and
//!    `status.lastSuccessfulTime`;
//! 2. deletes finished Jobs past `successfulJobsHistoryLimit` (3) / `failedJobsHistoryLimit` (1);
//! 3. unless suspended, finds the most recent schedule time not yet run, counted from
//!    `lastScheduleTime` (or the creation) but no earlier than `startingDeadlineSeconds` ago:
//!    missed runs are caught up at most once, and more than 100 missed ones raise a
//!    `TooManyMissedTimes` warning; it honours `concurrencyPolicy` (Allow, Forbid: skip while a
//!    Job runs, Replace: delete the running ones) and creates the Job
//!    `<cronjob>-<scheduled time in minutes since the epoch>` with the
//!    `batch.kubernetes.io/cronjob-scheduled-timestamp` annotation;
//! 4. requeues itself for the next schedule time.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, Zoned};
use k8s_openapi::api::batch::v1::{CronJob, CronJobStatus, Job};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, DeleteParams, ListParams, PostParams, PropagationPolicy};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use tokio_util::sync::CancellationToken;

use crate::Context;
use crate::events::{EventType, Recorder};
use crate::pods;

const NAME: &str = "cronjob";
const COMPONENT: &str = "cronjob-controller";

/// Annotation with the time a Job was scheduled for, in the schedule's time zone (RFC 3339).
pub const SCHEDULED_TIMESTAMP: &str = "batch.kubernetes.io/cronjob-scheduled-timestamp";
/// More missed schedule times than this raise `TooManyMissedTimes`.
const MISSED_LIMIT: u64 = 100;
/// How far past a schedule time the controller wakes up.
const NEXT_DELTA: Duration = Duration::from_millis(100);

/// What a reconcile can fail with; the CronJob is retried.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("api request failed: {0}")]
    Api(#[from] kube::Error),
    #[error("the cronjob has no {0}")]
    Incomplete(&'static str),
}

/// Why a schedule cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("cannot use TZ or CRON_TZ in schedule, use timeZone field instead")]
    TimeZoneInSchedule,
    #[error("{0}")]
    Unparseable(String),
    #[error("unknown time zone {0}")]
    UnknownTimeZone(String),
    #[error("timeZone must be nil or non-empty string")]
    EmptyTimeZone,
    #[error("timeZone must be an explicit time zone as defined in https://www.iana.org/time-zones")]
    LocalTimeZone,
}

/// When a CronJob runs: a parsed schedule in its time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    kind: ScheduleKind,
    tz: TimeZone,
}

#[derive(Debug, Clone)]
enum ScheduleKind {
    Cron(Box<croner::Cron>),
    /// `@every <duration>`: a fixed delay, in whole seconds.
    Every(SignedDuration),
}

impl Schedule {
    /// Parses `schedule` for `time_zone` (an IANA name; none: cloudcore's local zone).
    pub fn parse(schedule: &str, time_zone: Option<&str>) -> Result<Schedule, ScheduleError> {
        let tz = match time_zone {
            None => TimeZone::system(),
            Some(name) => time_zone_named(name)?,
        };
        if schedule.contains("TZ") {
            return Err(ScheduleError::TimeZoneInSchedule);
        }
        let trimmed = schedule.trim();
        let kind = if let Some(every) = trimmed.strip_prefix("@every ") {
            let delay = parse_go_duration(every.trim()).ok_or_else(|| {
                ScheduleError::Unparseable(format!("failed to parse duration {trimmed}"))
            })?;
            ScheduleKind::Every(delay.max(SignedDuration::from_secs(1)))
        } else {
            let pattern = if trimmed.eq_ignore_ascii_case("@midnight") {
                "@daily"
            } else {
                trimmed
            };
            if !pattern.starts_with('@') {
                check_fields(pattern)?;
            }
            let cron = croner::parser::CronParser::builder()
                .seconds(croner::parser::Seconds::Disallowed)
                .year(croner::parser::Year::Disallowed)
                .build()
                .parse(pattern)
                .map_err(|e| ScheduleError::Unparseable(e.to_string()))?;
            ScheduleKind::Cron(Box::new(cron))
        };
        Ok(Schedule { kind, tz })
    }

    /// The first schedule time strictly after `t`.
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        match &self.kind {
            ScheduleKind::Every(delay) => {
                // Go's ConstantDelaySchedule: add the delay, drop the sub-second part.
                let next = t.checked_add(*delay).ok()?;
                Timestamp::from_second(next.as_second()).ok()
            }
            ScheduleKind::Cron(cron) => {
                let zoned = t.to_zoned(self.tz.clone());
                cron.find_next_occurrence(&zoned, false)
                    .ok()
                    .map(|z| z.timestamp())
            }
        }
    }

    /// The most recent schedule time in `(earliest, now]` and how many there were.
    pub fn most_recent(&self, earliest: Timestamp, now: Timestamp) -> (Option<Timestamp>, u64) {
        let Some(first) = self.next_after(earliest).filter(|t| *t <= now) else {
            return (None, 0);
        };
        let mut last = first;
        let mut count = 1;
        // Walk until past `now`; beyond the limit, estimate from the period as
        // kube-controller-manager does.
        while count <= MISSED_LIMIT {
            match self.next_after(last) {
                Some(t) if t <= now => {
                    let period = t.duration_since(last);
                    last = t;
                    count += 1;
                    if count > MISSED_LIMIT && period > SignedDuration::ZERO {
                        let rest = now.duration_since(last).as_secs() / period.as_secs().max(1);
                        count += rest.unsigned_abs();
                        last = self.latest_at_or_before(now).unwrap_or(last);
                    }
                }
                _ => break,
            }
        }
        (Some(last), count)
    }

    /// The last schedule time at or before `now` (beyond the walk's limit).
    fn latest_at_or_before(&self, now: Timestamp) -> Option<Timestamp> {
        match &self.kind {
            ScheduleKind::Every(_) => None,
            ScheduleKind::Cron(cron) => cron
                .find_previous_occurrence(&now.to_zoned(self.tz.clone()), true)
                .ok()
                .map(|z| z.timestamp()),
        }
    }

    /// `t` in the schedule's time zone, as RFC 3339 (`Z` for UTC, as Go writes it).
    pub fn format(&self, t: Timestamp) -> String {
        let zoned: Zoned = t.to_zoned(self.tz.clone());
        if zoned.offset().seconds() == 0 {
            return t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
        }
        zoned.strftime("%Y-%m-%dT%H:%M:%S%:z").to_string()
    }
}

/// The bounds of the five fields: minute, hour, day of month, month, day of week.
const FIELD_BOUNDS: [(u32, u32); 5] = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)];

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// The field count and numeric bounds, with the messages of the cron parser kube-apiserver
/// uses (the rest of the syntax is the cron crate's to check).
fn check_fields(pattern: &str) -> Result<(), ScheduleError> {
    let fields: Vec<&str> = pattern.split_whitespace().collect();
    if fields.len() != 5 {
        return Err(ScheduleError::Unparseable(format!(
            "expected exactly 5 fields, found {}: [{}]",
            fields.len(),
            fields.join(" ")
        )));
    }
    for (i, (field, (min, max))) in fields.iter().zip(FIELD_BOUNDS).enumerate() {
        for part in field.split(',') {
            let (range, step) = part.split_once('/').unwrap_or((part, "1"));
            let (start, end) = range.split_once('-').unwrap_or((range, range));
            // Numbers, `*`/`?`, and month or weekday names where they belong; nothing else
            // (no `L`, `W` or `#`, which the cron crate would take).
            let names: &[&str] = match i {
                3 => &MONTHS,
                4 => &WEEKDAYS,
                _ => &[],
            };
            for token in [start, end, step] {
                let known = token.parse::<u32>().is_ok()
                    || (token != step && matches!(token, "*" | "?"))
                    || names.iter().any(|n| n.eq_ignore_ascii_case(token));
                if !known {
                    return Err(ScheduleError::Unparseable(format!(
                        "failed to parse int from {token}: strconv.Atoi: parsing {token:?}: invalid syntax"
                    )));
                }
            }
            if let Ok(start) = start.parse::<u32>()
                && start < min
            {
                return Err(ScheduleError::Unparseable(format!(
                    "beginning of range ({start}) below minimum ({min}): {part}"
                )));
            }
            if let Ok(end) = end.parse::<u32>()
                && end > max
            {
                return Err(ScheduleError::Unparseable(format!(
                    "end of range ({end}) above maximum ({max}): {part}"
                )));
            }
        }
    }
    Ok(())
}

/// The time zone `name`, checked as kube-apiserver checks `spec.timeZone`.
fn time_zone_named(name: &str) -> Result<TimeZone, ScheduleError> {
    if name.is_empty() {
        return Err(ScheduleError::EmptyTimeZone);
    }
    if name.eq_ignore_ascii_case("Local") {
        return Err(ScheduleError::LocalTimeZone);
    }
    let part_ok = |p: &str| {
        p != "."
            && p != ".."
            && !p.starts_with('-')
            && (1..=14).contains(&p.len())
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b))
    };
    if !name.split('/').all(part_ok) {
        return Err(ScheduleError::UnknownTimeZone(name.to_string()));
    }
    TimeZone::get(name).map_err(|_| ScheduleError::UnknownTimeZone(name.to_string()))
}

/// A Go duration (`90s`, `5m`, `1h30m`, `1.5h`) in whole units of h, m, s, ms.
fn parse_go_duration(s: &str) -> Option<SignedDuration> {
    if s.is_empty() {
        return None;
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds;
    }
    SignedDuration::try_from_secs_f64(total).ok()
}

/// The problems kube-apiserver reports for a CronJob's `spec.schedule` and `spec.timeZone`, as
/// (field, message) pairs; empty when both are fine.
pub fn validate(schedule: &str, time_zone: Option<&str>) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    if let Some(name) = time_zone
        && let Err(e) = time_zone_named(name)
    {
        problems.push(("spec.timeZone", e.to_string()));
    }
    if schedule.is_empty() {
        problems.push(("spec.schedule", "Required value".to_string()));
        return problems;
    }
    // kube-apiserver's parser reads a leading `TZ=`/`CRON_TZ=` itself; the refusal follows.
    let pattern = match schedule.split_once(char::is_whitespace) {
        Some((zone, rest)) if zone.starts_with("TZ=") || zone.starts_with("CRON_TZ=") => rest,
        _ => schedule,
    };
    if let Err(e) = Schedule::parse(pattern, Some("UTC")) {
        problems.push(("spec.schedule", e.to_string()));
    }
    if schedule.contains("TZ") {
        problems.push((
            "spec.schedule",
            ScheduleError::TimeZoneInSchedule.to_string(),
        ));
    }
    problems
}

struct State {
    ctx: Arc<Context>,
    recorder: Recorder,
}

/// Runs the CronJob controller until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let client = ctx.client.clone();
    let cronjobs: Api<CronJob> = Api::all(client.clone());
    let jobs: Api<Job> = Api::all(client);
    let state = Arc::new(State {
        recorder: ctx.recorder.for_component(COMPONENT),
        ctx: ctx.clone(),
    });
    let controller = Controller::new(cronjobs, watcher::Config::default())
        .owns(jobs, watcher::Config::default())
        .graceful_shutdown_on(shutdown.clone().cancelled_owned());
    let store = controller.store();
    tokio::spawn(crate::job::mark_when_listed(
        ctx.clone(),
        NAME,
        store,
        shutdown.clone(),
    ));
    controller
        .run(reconcile, error_policy, state)
        .for_each(|result| {
            crate::job::report_sync(&ctx, NAME, &result);
            async {}
        })
        .await;
}

fn error_policy(_cj: Arc<CronJob>, error: &Error, _state: Arc<State>) -> Action {
    match error {
        Error::Api(kube::Error::Api(status)) if status.code == 409 => {
            Action::requeue(Duration::from_millis(200))
        }
        _ => {
            tracing::debug!(%error, "cronjob reconcile failed");
            Action::requeue(Duration::from_secs(2))
        }
    }
}

fn cronjob_ref(cj: &CronJob) -> ObjectReference {
    ObjectReference {
        api_version: Some("batch/v1".into()),
        kind: Some("CronJob".into()),
        name: cj.metadata.name.clone(),
        namespace: cj.metadata.namespace.clone(),
        uid: cj.metadata.uid.clone(),
        resource_version: cj.metadata.resource_version.clone(),
        ..ObjectReference::default()
    }
}

fn job_ref(job: &Job) -> ObjectReference {
    ObjectReference {
        api_version: Some("batch/v1".into()),
        kind: Some("Job".into()),
        name: job.metadata.name.clone(),
        namespace: job.metadata.namespace.clone(),
        uid: job.metadata.uid.clone(),
        resource_version: job.metadata.resource_version.clone(),
        ..ObjectReference::default()
    }
}

/// `Complete` or `Failed`, when the Job has finished.
fn finished_as(job: &Job) -> Option<&'static str> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    ["Complete", "Failed"].into_iter().find(|t| {
        conditions
            .iter()
            .any(|c| c.type_ == *t && c.status == "True")
    })
}

/// The Job's name for a schedule time: `<cronjob>-<minutes since the epoch>`.
pub fn job_name(cronjob: &str, scheduled: Timestamp) -> String {
    format!("{cronjob}-{}", scheduled.as_second().div_euclid(60))
}

async fn reconcile(cached: Arc<CronJob>, state: Arc<State>) -> Result<Action, Error> {
    let ns = cached
        .metadata
        .namespace
        .clone()
        .ok_or(Error::Incomplete("namespace"))?;
    let name = cached
        .metadata
        .name
        .clone()
        .ok_or(Error::Incomplete("name"))?;
    let client = state.ctx.client.clone();
    let cronjobs: Api<CronJob> = Api::namespaced(client.clone(), &ns);
    let jobs_api: Api<Job> = Api::namespaced(client, &ns);
    let Some(cj) = cronjobs.get_opt(&name).await? else {
        return Ok(Action::await_change());
    };
    let uid = cj.metadata.uid.clone().ok_or(Error::Incomplete("uid"))?;
    let spec = cj.spec.clone().ok_or(Error::Incomplete("spec"))?;
    let jobs: Vec<Job> = jobs_api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|j| pods::controller_of(&j.metadata).is_some_and(|r| r.uid == uid))
        .collect();
    let now = Timestamp::now();
    let mut r = Reconcile {
        recorder: &state.recorder,
        cronjobs,
        jobs_api,
        cj,
    };
    let mut status = r.cj.status.clone().unwrap_or_default();

    // 1. The active list and the last success.
    let mut active = status.active.clone().unwrap_or_default();
    for job in &jobs {
        let job_uid = job.metadata.uid.as_deref();
        let in_active = active.iter().any(|a| a.uid.as_deref() == job_uid);
        let job_name = job.metadata.name.clone().unwrap_or_default();
        match finished_as(job) {
            None if !in_active => {
                r.publish(
                    EventType::Warning,
                    "UnexpectedJob",
                    &format!("Saw a job that the controller did not create or forgot: {job_name}"),
                )
                .await;
            }
            Some(how) if in_active => {
                active.retain(|a| a.uid.as_deref() != job_uid);
                r.publish(
                    EventType::Normal,
                    "SawCompletedJob",
                    &format!("Saw completed job: {job_name}, status: {how}"),
                )
                .await;
            }
            _ => {}
        }
        if finished_as(job) == Some("Complete")
            && let Some(done) = job.status.as_ref().and_then(|s| s.completion_time.clone())
            && status
                .last_successful_time
                .as_ref()
                .is_none_or(|t| t.0 < done.0)
        {
            status.last_successful_time = Some(done);
        }
    }
    let mut missing = Vec::new();
    for a in &active {
        if jobs.iter().any(|j| j.metadata.uid == a.uid) {
            continue;
        }
        // Not in the list: make sure with a read of its own before forgetting it.
        let job_name = a.name.clone().unwrap_or_default();
        match r.jobs_api.get_opt(&job_name).await? {
            Some(j) if j.metadata.uid == a.uid => {}
            _ => missing.push(job_name),
        }
    }
    for job_name in &missing {
        active.retain(|a| a.name.as_deref() != Some(job_name.as_str()));
        r.publish(
            EventType::Normal,
            "MissingJob",
            &format!("Active job went missing: {job_name}"),
        )
        .await;
    }
    status.active = (!active.is_empty()).then(|| active.clone());
    r.write_status(status.clone()).await?;
    if r.cj.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }

    // 2. History limits.
    r.clean_up_history(&spec, &jobs).await?;

    // 3. The schedule.
    let schedule = match Schedule::parse(&spec.schedule, spec.time_zone.as_deref()) {
        Ok(s) => s,
        Err(
            e @ (ScheduleError::UnknownTimeZone(_)
            | ScheduleError::EmptyTimeZone
            | ScheduleError::LocalTimeZone),
        ) => {
            let tz = spec.time_zone.clone().unwrap_or_default();
            r.publish(
                EventType::Warning,
                "UnknownTimeZone",
                &format!("invalid timeZone: {tz:?}: {e}"),
            )
            .await;
            return Ok(Action::await_change());
        }
        Err(e) => {
            r.publish(
                EventType::Warning,
                "UnparseableSchedule",
                &format!("unparseable schedule: {:?} : {e}", spec.schedule),
            )
            .await;
            return Ok(Action::await_change());
        }
    };
    if spec.suspend == Some(true) {
        return Ok(Action::await_change());
    }
    let requeue_next = match schedule.next_after(now) {
        Some(next) => Action::requeue(until(now, next) + NEXT_DELTA),
        None => Action::await_change(),
    };
    let mut earliest = status
        .last_schedule_time
        .as_ref()
        .map(|t| t.0)
        .or_else(|| r.cj.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .unwrap_or(now);
    if let Some(deadline) = spec.starting_deadline_seconds {
        let window_start = now - SignedDuration::from_secs(deadline);
        if window_start > earliest {
            earliest = window_start;
        }
    }
    let (scheduled, missed) = schedule.most_recent(earliest, now);
    if missed > MISSED_LIMIT {
        r.publish(
            EventType::Warning,
            "TooManyMissedTimes",
            &format!("too many missed start times: {missed}. Set or decrease .spec.startingDeadlineSeconds or check clock skew"),
        )
        .await;
    }
    let Some(scheduled) = scheduled else {
        return Ok(requeue_next);
    };
    if let Some(deadline) = spec.starting_deadline_seconds
        && scheduled + SignedDuration::from_secs(deadline) < now
    {
        r.publish(
            EventType::Warning,
            "MissSchedule",
            &format!(
                "Missed scheduled time to start a job: {}",
                scheduled.strftime("%a, %d %b %Y %H:%M:%S +0000")
            ),
        )
        .await;
        return Ok(requeue_next);
    }
    let new_name = job_name(&name, scheduled);
    if active
        .iter()
        .any(|a| a.name.as_deref() == Some(new_name.as_str()))
    {
        return Ok(requeue_next);
    }
    match spec.concurrency_policy.as_deref() {
        Some("Forbid") if !active.is_empty() => {
            r.publish(
                EventType::Normal,
                "JobAlreadyActive",
                "Not starting job because prior execution is running and concurrency policy is Forbid",
            )
            .await;
            return Ok(requeue_next);
        }
        Some("Replace") => {
            for a in std::mem::take(&mut active) {
                let job_name = a.name.clone().unwrap_or_default();
                r.delete_job(&job_name).await?;
            }
        }
        _ => {}
    }
    let job = job_for(&r.cj, &spec, &new_name, schedule.format(scheduled));
    let created = match r.jobs_api.create(&PostParams::default(), &job).await {
        Ok(created) => {
            r.publish(
                EventType::Normal,
                "SuccessfulCreate",
                &format!("Created job {new_name}"),
            )
            .await;
            created
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            // Created before a crash or by someone else: ours if we control it.
            match r.jobs_api.get_opt(&new_name).await? {
                Some(existing)
                    if pods::controller_of(&existing.metadata).is_some_and(|o| o.uid == uid) =>
                {
                    existing
                }
                _ => return Ok(requeue_next),
            }
        }
        Err(e) => {
            r.publish(
                EventType::Warning,
                "FailedCreate",
                &format!("Error creating job: {e}"),
            )
            .await;
            return Err(e.into());
        }
    };
    if finished_as(&created).is_none() {
        active.push(job_ref(&created));
    }
    status.active = (!active.is_empty()).then_some(active);
    status.last_schedule_time = Some(Time(scheduled));
    r.write_status(status).await?;
    Ok(requeue_next)
}

/// One reconcile of one CronJob.
struct Reconcile<'a> {
    recorder: &'a Recorder,
    cronjobs: Api<CronJob>,
    jobs_api: Api<Job>,
    /// The CronJob as last read or written.
    cj: CronJob,
}

impl Reconcile<'_> {
    async fn publish(&self, type_: EventType, reason: &str, message: &str) {
        self.recorder
            .publish(&cronjob_ref(&self.cj), type_, reason, message)
            .await;
    }

    async fn write_status(&mut self, status: CronJobStatus) -> Result<(), Error> {
        let current = self.cj.status.clone().unwrap_or_default();
        if current == status {
            return Ok(());
        }
        let mut cj = self.cj.clone();
        cj.status = Some(status);
        let name = cj.metadata.name.clone().unwrap_or_default();
        self.cj = self
            .cronjobs
            .replace_status(&name, &PostParams::default(), &cj)
            .await?;
        Ok(())
    }

    async fn delete_job(&self, job_name: &str) -> Result<(), Error> {
        let params = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Background),
            ..DeleteParams::default()
        };
        match self.jobs_api.delete(job_name, &params).await {
            Ok(_) => {
                self.publish(
                    EventType::Normal,
                    "SuccessfulDelete",
                    &format!("Deleted job {job_name}"),
                )
                .await;
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => {
                self.publish(
                    EventType::Warning,
                    "FailedDelete",
                    &format!("Deleted job: {e}"),
                )
                .await;
                Err(e.into())
            }
        }
    }

    /// Deletes the oldest finished Jobs beyond the history limits.
    async fn clean_up_history(
        &self,
        spec: &k8s_openapi::api::batch::v1::CronJobSpec,
        jobs: &[Job],
    ) -> Result<(), Error> {
        for (how, limit) in [
            ("Complete", spec.successful_jobs_history_limit.unwrap_or(3)),
            ("Failed", spec.failed_jobs_history_limit.unwrap_or(1)),
        ] {
            let mut finished: Vec<&Job> = jobs
                .iter()
                .filter(|j| finished_as(j) == Some(how) && j.metadata.deletion_timestamp.is_none())
                .collect();
            let limit = usize::try_from(limit.max(0)).unwrap_or(0);
            if finished.len() <= limit {
                continue;
            }
            finished.sort_by_key(|j| history_order(j));
            let excess = finished.len() - limit;
            for job in finished.into_iter().take(excess) {
                let job_name = job.metadata.name.clone().unwrap_or_default();
                self.delete_job(&job_name).await?;
            }
        }
        Ok(())
    }
}

/// Oldest first: by start time (none last), then name.
fn history_order(job: &Job) -> (bool, Option<Timestamp>, String) {
    let start = job
        .status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .map(|t| t.0);
    (
        start.is_none(),
        start,
        job.metadata.name.clone().unwrap_or_default(),
    )
}

/// The Job a CronJob starts for one schedule time.
fn job_for(
    cj: &CronJob,
    spec: &k8s_openapi::api::batch::v1::CronJobSpec,
    name: &str,
    scheduled: String,
) -> Job {
    let template = spec.job_template.metadata.clone().unwrap_or_default();
    let mut annotations = template.annotations.unwrap_or_default();
    annotations.insert(SCHEDULED_TIMESTAMP.to_string(), scheduled);
    Job {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: cj.metadata.namespace.clone(),
            labels: template.labels,
            annotations: Some(annotations),
            owner_references: Some(vec![pods::owner_reference(
                "batch/v1",
                "CronJob",
                &cj.metadata,
            )]),
            ..ObjectMeta::default()
        },
        spec: spec.job_template.spec.clone(),
        status: None,
    }
}

fn until(now: Timestamp, then: Timestamp) -> Duration {
    Duration::try_from(then.duration_since(now)).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    #[test]
    fn five_fields_and_macros_give_the_next_time() {
        let every_minute = Schedule::parse("*/1 * * * *", Some("UTC")).expect("parse");
        assert_eq!(
            every_minute.next_after(at("2026-01-01T10:00:30Z")),
            Some(at("2026-01-01T10:01:00Z"))
        );
        // Strictly after: a time on the schedule gives the following one.
        assert_eq!(
            every_minute.next_after(at("2026-01-01T10:01:00Z")),
            Some(at("2026-01-01T10:02:00Z"))
        );
        let cases = [
            ("@hourly", "2026-01-01T11:00:00Z"),
            ("@daily", "2026-01-02T00:00:00Z"),
            ("@midnight", "2026-01-02T00:00:00Z"),
            ("@weekly", "2026-01-04T00:00:00Z"),
            ("@monthly", "2026-02-01T00:00:00Z"),
            ("@yearly", "2027-01-01T00:00:00Z"),
            ("@annually", "2027-01-01T00:00:00Z"),
            ("30 2 * * 1-5", "2026-01-02T02:30:00Z"),
            ("@every 90s", "2026-01-01T10:32:00Z"),
        ];
        for (schedule, want) in cases {
            let s = Schedule::parse(schedule, Some("UTC")).expect(schedule);
            assert_eq!(
                s.next_after(at("2026-01-01T10:30:30Z")),
                Some(at(want)),
                "{schedule}"
            );
        }
    }

    #[test]
    fn a_time_zone_moves_the_schedule() {
        let s = Schedule::parse("0 9 * * *", Some("Europe/Paris")).expect("parse");
        // 09:00 in Paris in winter is 08:00 UTC.
        let next = s.next_after(at("2026-01-01T00:00:00Z")).expect("next");
        assert_eq!(next, at("2026-01-01T08:00:00Z"));
        assert_eq!(s.format(next), "2026-01-01T09:00:00+01:00");
        let utc = Schedule::parse("0 9 * * *", Some("UTC")).expect("parse");
        assert_eq!(
            utc.format(at("2026-01-01T09:00:00Z")),
            "2026-01-01T09:00:00Z"
        );
    }

    #[test]
    fn bad_schedules_and_zones_are_refused_as_kube_apiserver_refuses_them() {
        assert_eq!(
            validate("CRON_TZ=UTC * * * * *", None),
            vec![(
                "spec.schedule",
                "cannot use TZ or CRON_TZ in schedule, use timeZone field instead".to_string()
            )]
        );
        assert_eq!(
            Schedule::parse("TZ=UTC 0 * * * *", None).err(),
            Some(ScheduleError::TimeZoneInSchedule)
        );
        assert_eq!(
            validate("61 * * * *", None),
            vec![(
                "spec.schedule",
                "end of range (61) above maximum (59): 61".to_string()
            )]
        );
        assert_eq!(
            validate("0 0 0 * *", None)[0].1,
            "beginning of range (0) below minimum (1): 0"
        );
        assert_eq!(
            validate("* * * *", None)[0].1,
            "expected exactly 5 fields, found 4: [* * * *]"
        );
        assert!(!validate("* * * * MON-FOO", None).is_empty());
        assert_eq!(
            validate("0 0 L * *", None)[0].1,
            "failed to parse int from L: strconv.Atoi: parsing \"L\": invalid syntax"
        );
        assert!(!validate("0 0 * * 1#2", None).is_empty());
        assert!(validate("0 0 ? JUL-DEC mon-FRI", None).is_empty());
        assert!(validate("*/15 0-6/2 1,15 * *", None).is_empty());
        assert_eq!(
            validate("* * * * *", Some("Europe/Pariss")),
            vec![(
                "spec.timeZone",
                "unknown time zone Europe/Pariss".to_string()
            )]
        );
        assert_eq!(validate("* * * * *", Some("local"))[0].0, "spec.timeZone");
        assert_eq!(validate("* * * * *", Some(""))[0].0, "spec.timeZone");
        assert_eq!(
            validate("", None)[0],
            ("spec.schedule", "Required value".to_string())
        );
        assert!(validate("*/5 * * * *", Some("America/New_York")).is_empty());
        assert!(validate("@every 1h30m", None).is_empty());
        assert!(!validate("@every soon", None).is_empty());
    }

    #[test]
    fn missed_runs_collapse_into_the_most_recent_one() {
        let s = Schedule::parse("* * * * *", Some("UTC")).expect("parse");
        let created = at("2026-01-01T10:00:10Z");
        // Nothing due yet.
        assert_eq!(
            s.most_recent(created, at("2026-01-01T10:00:50Z")),
            (None, 0)
        );
        // One due.
        assert_eq!(
            s.most_recent(created, at("2026-01-01T10:01:05Z")),
            (Some(at("2026-01-01T10:01:00Z")), 1)
        );
        // Five missed (a restart): only the last one runs.
        assert_eq!(
            s.most_recent(created, at("2026-01-01T10:05:30Z")),
            (Some(at("2026-01-01T10:05:00Z")), 5)
        );
        // A day missed: more than 100, counted, and still the most recent one.
        let (last, count) = s.most_recent(created, at("2026-01-02T10:00:30Z"));
        assert_eq!(last, Some(at("2026-01-02T10:00:00Z")));
        assert!((1439..=1441).contains(&count), "{count}");
    }

    #[test]
    fn jobs_carry_the_template_metadata_the_scheduled_time_and_the_owner() {
        use k8s_openapi::api::batch::v1::{CronJobSpec, JobTemplateSpec};
        let cj = CronJob {
            metadata: ObjectMeta {
                name: Some("tick".into()),
                namespace: Some("ops".into()),
                uid: Some("cj-1".into()),
                ..ObjectMeta::default()
            },
            spec: Some(CronJobSpec {
                schedule: "*/5 * * * *".into(),
                job_template: JobTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some([("app".to_string(), "tick".to_string())].into()),
                        annotations: Some([("note".to_string(), "x".to_string())].into()),
                        ..ObjectMeta::default()
                    }),
                    spec: None,
                },
                ..CronJobSpec::default()
            }),
            status: None,
        };
        let spec = cj.spec.clone().expect("spec");
        let job = job_for(&cj, &spec, "tick-29454365", "2026-01-01T10:05:00Z".into());
        assert_eq!(job.metadata.name.as_deref(), Some("tick-29454365"));
        assert_eq!(job.metadata.namespace.as_deref(), Some("ops"));
        assert_eq!(job.metadata.labels.unwrap_or_default()["app"], "tick");
        let annotations = job.metadata.annotations.unwrap_or_default();
        assert_eq!(annotations["note"], "x");
        assert_eq!(annotations[SCHEDULED_TIMESTAMP], "2026-01-01T10:05:00Z");
        let owner = &job.metadata.owner_references.unwrap_or_default()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("CronJob", "cj-1", Some(true))
        );
    }

    #[test]
    fn job_names_count_minutes_since_the_epoch() {
        assert_eq!(
            job_name("hello", at("2026-01-01T10:01:00Z")),
            "hello-29454361"
        );
        assert_eq!(
            parse_go_duration("1h30m"),
            Some(SignedDuration::from_secs(5400))
        );
        assert_eq!(
            parse_go_duration("1.5h"),
            Some(SignedDuration::from_secs(5400))
        );
        assert_eq!(parse_go_duration("10x"), None);
    }
}
