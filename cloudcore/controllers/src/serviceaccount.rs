//! The ServiceAccount controller: every namespace that is not terminating has a ServiceAccount
//! named `default`, as kube-controller-manager's serviceaccount-controller keeps it. A new
//! namespace gets one, and a deleted `default` account comes back.
//!
//! It watches Namespaces and the `default` ServiceAccounts and syncs a namespace on each
//! namespace event and each deletion of its account. A sync is a create that treats
//! `AlreadyExists` as done, so a namespace synced twice or an account someone else made is
//! harmless; a namespace being deleted is skipped (the API refuses new content there).

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio_util::sync::CancellationToken;

use crate::Context;

/// The name this controller reports under in [`Context::mark_synced`].
pub const NAME: &str = "serviceaccount";
/// The account every namespace gets.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// What the two watches tell the sync loop.
enum Change {
    /// A namespace exists (listed, added or changed), and whether it is terminating.
    Namespace { name: String, terminating: bool },
    /// The `default` account of this namespace was deleted.
    AccountDeleted(String),
    /// Watch `index` has listed everything (`true`) or lost its watch (`false`).
    Synced(usize, bool),
}

/// Runs the ServiceAccount controller until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    let accounts: Api<ServiceAccount> = Api::all(ctx.client.clone());
    let namespace_changes = watcher::watcher(namespaces, watcher::Config::default())
        .default_backoff()
        .map(|event| {
        match event {
            Ok(Event::Apply(ns) | Event::InitApply(ns)) => ns
                .metadata
                .name
                .clone()
                .map(|name| Change::Namespace {
                    name,
                    terminating: terminating(&ns),
                })
                .into_iter()
                .collect(),
            Ok(Event::InitDone) => vec![Change::Synced(0, true)],
            Ok(Event::Init | Event::Delete(_)) => vec![],
            Err(e) => {
                tracing::warn!(error = %e, "serviceaccount controller: namespace watch failed; relisting");
                vec![Change::Synced(0, false)]
            }
        }
    });
    let account_config =
        watcher::Config::default().fields(&format!("metadata.name={DEFAULT_SERVICE_ACCOUNT}"));
    let account_changes = watcher::watcher(accounts, account_config)
        .default_backoff()
        .map(|event| match event {
        Ok(Event::Delete(sa)) => sa
            .metadata
            .namespace
            .map(Change::AccountDeleted)
            .into_iter()
            .collect(),
        Ok(Event::InitDone) => vec![Change::Synced(1, true)],
        Ok(_) => vec![],
        Err(e) => {
            tracing::warn!(error = %e, "serviceaccount controller: serviceaccount watch failed; relisting");
            vec![Change::Synced(1, false)]
        }
    });
    let mut changes = futures::stream::select(namespace_changes, account_changes)
        .flat_map(futures::stream::iter)
        .boxed();
    let mut synced = [false, false];
    loop {
        let change = tokio::select! {
            _ = shutdown.cancelled() => return,
            change = changes.next() => change,
        };
        let Some(change) = change else {
            return;
        };
        match change {
            Change::Synced(index, ok) => {
                synced[index] = ok;
                ctx.mark_synced(NAME, synced.iter().all(|s| *s));
            }
            Change::Namespace { name, terminating } => {
                if !terminating {
                    ensure_default(&ctx, &name).await;
                }
            }
            Change::AccountDeleted(namespace) => {
                let api: Api<Namespace> = Api::all(ctx.client.clone());
                match api.get_opt(&namespace).await {
                    Ok(Some(ns)) if !terminating(&ns) => ensure_default(&ctx, &namespace).await,
                    Ok(_) => {}
                    Err(e) => tracing::warn!(
                        namespace,
                        error = %e,
                        "serviceaccount controller: cannot read namespace"
                    ),
                }
            }
        }
    }
}

/// Whether a namespace is being deleted: the API refuses new content in it.
fn terminating(ns: &Namespace) -> bool {
    ns.metadata.deletion_timestamp.is_some()
        || ns
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|phase| phase == "Terminating")
}

/// Creates the namespace's `default` account unless it exists. Failures are logged: the next
/// event for the namespace (or the next relist) tries again.
async fn ensure_default(ctx: &Context, namespace: &str) {
    let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), namespace);
    let account = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(DEFAULT_SERVICE_ACCOUNT.to_string()),
            namespace: Some(namespace.to_string()),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    };
    match api.create(&PostParams::default(), &account).await {
        Ok(_) => tracing::info!(namespace, "default service account created"),
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        // The namespace began terminating (403) or went away (404) meanwhile.
        Err(kube::Error::Api(e)) if e.code == 403 || e.code == 404 => {
            tracing::debug!(namespace, reason = %e.reason, "default service account not created")
        }
        Err(e) => tracing::warn!(
            namespace,
            error = %e,
            "serviceaccount controller: cannot create the default service account"
        ),
    }
}
