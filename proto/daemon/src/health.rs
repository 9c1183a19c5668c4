//! Health checks in kube-apiserver's shape: `/livez`, `/readyz` and `/healthz`, each answering
//! 200 `ok` when every check it runs passes and 503 otherwise; with `?verbose` (always on a
//! failure) one line per check, `[+]name ok` or `[-]name failed: reason`.
//!
//! A check is either [`Probe::Liveness`] (the process itself is broken: a restart helps) or
//! [`Probe::Readiness`] (a dependency is out: a disk full, a runtime down, caches not synced; a
//! restart would not help, so only readiness fails). `/livez` runs the liveness checks,
//! `/readyz` and `/healthz` run all of them.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// How long one check may take before it counts as failed.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Which probe a check belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Fails only when restarting the process would help.
    Liveness,
    /// Fails while the process cannot do its work (a dependency is out).
    Readiness,
}

/// The three endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// Liveness checks only.
    Livez,
    /// Every check.
    Readyz,
    /// Every check (kept for older probes).
    Healthz,
}

impl Endpoint {
    /// The endpoint a request path names, if any.
    pub fn from_path(path: &str) -> Option<Endpoint> {
        match path.trim_end_matches('/') {
            "/livez" => Some(Endpoint::Livez),
            "/readyz" => Some(Endpoint::Readyz),
            "/healthz" => Some(Endpoint::Healthz),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Endpoint::Livez => "livez",
            Endpoint::Readyz => "readyz",
            Endpoint::Healthz => "healthz",
        }
    }
}

/// What a check returns: `Err` carries the reason shown after `failed:`.
pub type CheckResult = Result<(), String>;
/// A passing check may carry a note, shown after `ok:` in the verbose form.
type Noted = Result<Option<String>, String>;
type CheckFuture = Pin<Box<dyn Future<Output = Noted> + Send>>;
type CheckFn = Arc<dyn Fn() -> CheckFuture + Send + Sync>;

struct Check {
    name: &'static str,
    probe: Probe,
    run: CheckFn,
}

/// A set of named checks. Cheap to clone.
#[derive(Clone, Default)]
pub struct Health {
    checks: Arc<Vec<Check>>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.checks.iter().map(|c| (c.name, c.probe)))
            .finish()
    }
}

/// An endpoint's answer: the HTTP status code and the text body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// 200 or 503.
    pub status: u16,
    /// `ok`, or the per-check lines.
    pub body: String,
}

impl Health {
    /// Starts with the `ping` liveness check, which passes while the server answers.
    pub fn new() -> Health {
        Health::default().with("ping", Probe::Liveness, || async { Ok(()) })
    }

    /// Adds a check; `run` is called at every request to an endpoint that includes it.
    pub fn with<F, Fut>(self, name: &'static str, probe: Probe, run: F) -> Health
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = CheckResult> + Send + 'static,
    {
        let run = Arc::new(run);
        let run: CheckFn = Arc::new(move || {
            let run = run.clone();
            Box::pin(async move { run().await.map(|()| None) })
        });
        self.push(name, probe, run)
    }

    /// Adds a readiness check that always passes and says `note()` (e.g. which replica
    /// leads): `[+]name ok: NOTE` in the verbose form.
    pub fn with_note<F>(self, name: &'static str, note: F) -> Health
    where
        F: Fn() -> String + Send + Sync + 'static,
    {
        let note = Arc::new(note);
        let run: CheckFn = Arc::new(move || {
            let text = note();
            Box::pin(async move { Ok(Some(text)) })
        });
        self.push(name, Probe::Readiness, run)
    }

    fn push(mut self, name: &'static str, probe: Probe, run: CheckFn) -> Health {
        // Built once at start, before any clone is shared.
        let mut checks = Arc::try_unwrap(self.checks).unwrap_or_else(|shared| {
            shared
                .iter()
                .map(|c| Check {
                    name: c.name,
                    probe: c.probe,
                    run: c.run.clone(),
                })
                .collect()
        });
        checks.push(Check { name, probe, run });
        self.checks = Arc::new(checks);
        self
    }

    /// Runs the endpoint's checks (each under [`CHECK_TIMEOUT`]) and builds the answer.
    pub async fn answer(&self, endpoint: Endpoint, verbose: bool) -> Answer {
        let mut lines = String::new();
        let mut failed = Vec::new();
        for check in self.checks.iter() {
            if endpoint == Endpoint::Livez && check.probe != Probe::Liveness {
                continue;
            }
            let result = match tokio::time::timeout(CHECK_TIMEOUT, (check.run)()).await {
                Ok(result) => result,
                Err(_) => Err(format!("timed out after {}s", CHECK_TIMEOUT.as_secs())),
            };
            match result {
                Ok(None) => lines.push_str(&format!("[+]{} ok\n", check.name)),
                Ok(Some(note)) => {
                    let note = note.replace(['\n', '\r'], " ");
                    lines.push_str(&format!("[+]{} ok: {note}\n", check.name));
                }
                Err(reason) => {
                    // One line per check, whatever the reason holds.
                    let reason = reason.replace(['\n', '\r'], " ");
                    lines.push_str(&format!("[-]{} failed: {reason}\n", check.name));
                    failed.push(check.name);
                }
            }
        }
        if failed.is_empty() {
            let body = if verbose {
                format!("{lines}{} check passed\n", endpoint.name())
            } else {
                "ok\n".to_string()
            };
            return Answer { status: 200, body };
        }
        tracing::warn!(endpoint = endpoint.name(), failed = ?failed, "health check failed");
        Answer {
            status: 503,
            body: format!("{lines}{} check failed\n", endpoint.name()),
        }
    }
}

/// Whether a query string asks for the verbose form (`?verbose`, `?verbose=1`, ...).
pub fn is_verbose(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&')
            .any(|pair| pair == "verbose" || pair.starts_with("verbose="))
    })
}

/// A readiness check that `dir` takes a new file: writes 4 KiB to a probe file, fsyncs it
/// and removes it. Fails on a full disk, a read-only mount or a lost directory, the states in
/// which the daemon's own writes would fail.
pub async fn dir_writable(dir: PathBuf) -> CheckResult {
    tokio::task::spawn_blocking(move || probe_write(&dir))
        .await
        .map_err(|e| format!("probe task failed: {e}"))?
}

fn probe_write(dir: &Path) -> CheckResult {
    use std::io::Write;
    let path = dir.join(format!(".health-probe-{}", std::process::id()));
    let result = std::fs::File::create(&path)
        .and_then(|mut f| {
            f.write_all(&[0u8; 4096])?;
            f.sync_all()
        })
        .map_err(|e| format!("cannot write in {}: {e}", dir.display()));
    let _ = std::fs::remove_file(&path);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn all_passing_is_ok_and_verbose_lists_each_check() {
        let health = Health::new().with("store", Probe::Readiness, || async { Ok(()) });
        let answer = health.answer(Endpoint::Readyz, false).await;
        assert_eq!(
            answer,
            Answer {
                status: 200,
                body: "ok\n".into()
            }
        );
        let answer = health.answer(Endpoint::Readyz, true).await;
        assert_eq!(answer.status, 200);
        assert_eq!(
            answer.body,
            "[+]ping ok\n[+]store ok\nreadyz check passed\n"
        );
    }

    #[tokio::test]
    async fn a_note_is_shown_after_ok_in_the_verbose_form() {
        let health = Health::new().with_note("leader-election", || "replica-2 leads".into());
        let answer = health.answer(Endpoint::Readyz, true).await;
        assert_eq!(answer.status, 200);
        assert_eq!(
            answer.body,
            "[+]ping ok\n[+]leader-election ok: replica-2 leads\nreadyz check passed\n"
        );
    }

    #[tokio::test]
    async fn a_failing_readiness_check_fails_readyz_and_healthz_but_not_livez() {
        let health = Health::new().with("runtime", Probe::Readiness, || async {
            Err("connection refused\nsecond line".to_string())
        });
        for endpoint in [Endpoint::Readyz, Endpoint::Healthz] {
            let answer = health.answer(endpoint, false).await;
            assert_eq!(answer.status, 503);
            assert!(
                answer
                    .body
                    .contains("[-]runtime failed: connection refused second line\n"),
                "{answer:?}"
            );
        }
        let answer = health.answer(Endpoint::Livez, true).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body, "[+]ping ok\nlivez check passed\n");
    }

    #[tokio::test(start_paused = true)]
    async fn a_check_that_hangs_fails_after_the_timeout() {
        let health = Health::new().with("slow", Probe::Liveness, || async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        });
        let answer = health.answer(Endpoint::Livez, false).await;
        assert_eq!(answer.status, 503);
        assert!(
            answer.body.contains("[-]slow failed: timed out after 5s"),
            "{answer:?}"
        );
    }

    #[test]
    fn verbose_and_paths_parse() {
        assert!(is_verbose(Some("verbose")));
        assert!(is_verbose(Some("x=1&verbose=true")));
        assert!(!is_verbose(Some("verbosity=2")));
        assert!(!is_verbose(None));
        assert_eq!(Endpoint::from_path("/readyz/"), Some(Endpoint::Readyz));
        assert_eq!(Endpoint::from_path("/metrics"), None);
    }

    #[tokio::test]
    async fn dir_writable_names_the_directory_it_cannot_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(dir_writable(dir.path().to_path_buf()).await, Ok(()));
        assert!(
            std::fs::read_dir(dir.path())
                .expect("read")
                .next()
                .is_none()
        );
        let gone = dir.path().join("gone");
        let err = dir_writable(gone.clone()).await.unwrap_err();
        assert!(err.contains(&gone.display().to_string()), "{err}");
    }
}
