//! Server-side printing of the apps/v1, batch/v1 and ServiceAccount kinds: the columns and cells
//! of kube-apiserver's table printers for them (`kubectl get deploy` and friends), wide columns
//! included (kubectl hides priority-1 columns unless `-o wide`).

use serde_json::{Value, json};
use time::OffsetDateTime;

use super::{
    AGE, Column, NAME, array, column, human_duration, parse_timestamp, since, str_of, wide,
};
use crate::apiserver::workloads;

const CONTAINERS: Column = wide(
    "Containers",
    "string",
    "Names of each container in the template.",
);
const IMAGES: Column = wide(
    "Images",
    "string",
    "Images referenced by each container in the template.",
);
const SELECTOR: Column = wide(
    "Selector",
    "string",
    "Label query over the pods the object manages.",
);

const DEPLOYMENT_COLUMNS: &[Column] = &[
    NAME,
    column("Ready", "string", "Ready replicas out of desired replicas."),
    column(
        "Up-to-date",
        "integer",
        "Total number of non-terminated pods targeted by this deployment that have the desired template spec.",
    ),
    column(
        "Available",
        "integer",
        "Total number of available pods (ready for at least minReadySeconds) targeted by this deployment.",
    ),
    AGE,
    CONTAINERS,
    IMAGES,
    SELECTOR,
];
const REPLICASET_COLUMNS: &[Column] = &[
    NAME,
    column("Desired", "integer", "Replicas the spec asks for."),
    column("Current", "integer", "Replicas most recently observed."),
    column(
        "Ready",
        "integer",
        "Replicas with a Ready condition, most recently observed.",
    ),
    AGE,
    CONTAINERS,
    IMAGES,
    SELECTOR,
];
const DAEMONSET_COLUMNS: &[Column] = &[
    NAME,
    column(
        "Desired",
        "integer",
        "Nodes that should be running the daemon pod.",
    ),
    column(
        "Current",
        "integer",
        "Nodes running at least one daemon pod that are supposed to.",
    ),
    column(
        "Ready",
        "integer",
        "Nodes that should be running the daemon pod and have one or more of it running and ready.",
    ),
    column(
        "Up-to-date",
        "integer",
        "Nodes running the updated daemon pod.",
    ),
    column(
        "Available",
        "integer",
        "Nodes that should be running the daemon pod and have one or more of it running and available.",
    ),
    column("Node Selector", "string", "The template's node selector."),
    AGE,
    CONTAINERS,
    IMAGES,
    SELECTOR,
];
const STATEFULSET_COLUMNS: &[Column] = &[
    NAME,
    column("Ready", "string", "Number of the pod with ready state"),
    AGE,
    CONTAINERS,
    IMAGES,
];
const JOB_COLUMNS: &[Column] = &[
    NAME,
    column("Status", "string", "Status of the job."),
    column(
        "Completions",
        "string",
        "Succeeded pods out of the completions asked for.",
    ),
    column("Duration", "string", "Time required to complete the job."),
    AGE,
    CONTAINERS,
    IMAGES,
    SELECTOR,
];
const CRONJOB_COLUMNS: &[Column] = &[
    NAME,
    column("Schedule", "string", "The schedule in Cron format."),
    column("Timezone", "string", "The time zone of the schedule."),
    column("Suspend", "boolean", "Whether later runs are suspended."),
    column("Active", "integer", "Jobs currently running."),
    column(
        "Last Schedule",
        "string",
        "When a job was last successfully scheduled.",
    ),
    AGE,
    CONTAINERS,
    IMAGES,
    SELECTOR,
];
const SERVICE_ACCOUNT_COLUMNS: &[Column] = &[
    NAME,
    column(
        "Secrets",
        "integer",
        "Secrets listed by the service account.",
    ),
    AGE,
];
const CONTROLLER_REVISION_COLUMNS: &[Column] = &[
    NAME,
    column(
        "Controller",
        "string",
        "The object that owns the revision, as kind.group/name.",
    ),
    column("Revision", "integer", "Revision number of the state."),
    AGE,
];

/// The columns of `kind`, if it is one of these kinds.
pub(super) fn columns(kind: &str) -> Option<&'static [Column]> {
    Some(match kind {
        "Deployment" => DEPLOYMENT_COLUMNS,
        "ReplicaSet" => REPLICASET_COLUMNS,
        "DaemonSet" => DAEMONSET_COLUMNS,
        "StatefulSet" => STATEFULSET_COLUMNS,
        "Job" => JOB_COLUMNS,
        "CronJob" => CRONJOB_COLUMNS,
        "ServiceAccount" => SERVICE_ACCOUNT_COLUMNS,
        "ControllerRevision" => CONTROLLER_REVISION_COLUMNS,
        _ => return None,
    })
}

fn int(value: &Value) -> i64 {
    value.as_i64().unwrap_or(0)
}

/// Container names and images of a template, each joined by commas.
fn containers(template: &Value) -> (Value, Value) {
    let list = array(template, &["spec", "containers"]);
    let names: Vec<&str> = list.iter().map(|c| str_of(c, &["name"])).collect();
    let images: Vec<&str> = list.iter().map(|c| str_of(c, &["image"])).collect();
    (json!(names.join(",")), json!(images.join(",")))
}

/// A `metav1.LabelSelector` as kube-apiserver prints it: `<none>` when it selects nothing.
fn selector(value: &Value) -> Value {
    let text = workloads::selector_string(value);
    json!(if text.is_empty() {
        "<none>".to_string()
    } else {
        text
    })
}

/// A label map as `k=v,k2=v2` sorted by key, `<none>` when empty.
fn label_map(value: &Value) -> String {
    let pairs: Vec<String> = value
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    if pairs.is_empty() {
        "<none>".into()
    } else {
        pairs.join(",")
    }
}

fn has_condition(object: &Value, kind: &str) -> bool {
    array(object, &["status", "conditions"])
        .iter()
        .find(|c| c["type"] == kind)
        .is_some_and(|c| c["status"] == "True")
}

fn job_status(job: &Value) -> &'static str {
    if has_condition(job, "Complete") {
        "Complete"
    } else if has_condition(job, "Failed") {
        "Failed"
    } else if job["metadata"]["deletionTimestamp"].is_string() {
        "Terminating"
    } else if has_condition(job, "Suspended") {
        "Suspended"
    } else if has_condition(job, "FailureTarget") {
        "FailureTarget"
    } else {
        "Running"
    }
}

fn job_completions(spec: &Value, status: &Value) -> String {
    let succeeded = int(&status["succeeded"]);
    match spec["completions"].as_i64() {
        Some(completions) => format!("{succeeded}/{completions}"),
        None => match int(&spec["parallelism"]) {
            p if p > 1 => format!("{succeeded}/1 of {p}"),
            _ => format!("{succeeded}/1"),
        },
    }
}

fn job_duration(status: &Value, now: OffsetDateTime) -> String {
    let start = status["startTime"].as_str().and_then(parse_timestamp);
    let end = status["completionTime"].as_str().and_then(parse_timestamp);
    match (start, end) {
        (None, _) => String::new(),
        (Some(start), None) => human_duration(now - start),
        (Some(start), Some(end)) => human_duration(end - start),
    }
}

/// `statefulset.apps/web` for a controller reference, `<none>` without one.
fn controller_of(object: &Value) -> String {
    let Some(owner) = array(object, &["metadata", "ownerReferences"])
        .iter()
        .find(|o| o["controller"] == true)
    else {
        return "<none>".into();
    };
    let kind = str_of(owner, &["kind"]).to_ascii_lowercase();
    let group = str_of(owner, &["apiVersion"])
        .rsplit_once('/')
        .map(|(g, _)| g)
        .unwrap_or_default();
    let name = str_of(owner, &["name"]);
    if group.is_empty() {
        format!("{kind}/{name}")
    } else {
        format!("{kind}.{group}/{name}")
    }
}

/// The cells of one row of `kind` (one of [`columns`]'s kinds), in column order.
pub(super) fn cells(kind: &str, object: &Value, now: OffsetDateTime) -> Option<Vec<Value>> {
    let name = json!(str_of(object, &["metadata", "name"]));
    let age = json!(since(&object["metadata"]["creationTimestamp"], now));
    let (spec, status) = (&object["spec"], &object["status"]);
    let template = &spec["template"];
    Some(match kind {
        "Deployment" => {
            let (names, images) = containers(template);
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    int(&status["readyReplicas"]),
                    int(&spec["replicas"])
                )),
                json!(int(&status["updatedReplicas"])),
                json!(int(&status["availableReplicas"])),
                age,
                names,
                images,
                selector(&spec["selector"]),
            ]
        }
        "ReplicaSet" => {
            let (names, images) = containers(template);
            vec![
                name,
                json!(int(&spec["replicas"])),
                json!(int(&status["replicas"])),
                json!(int(&status["readyReplicas"])),
                age,
                names,
                images,
                selector(&spec["selector"]),
            ]
        }
        "DaemonSet" => {
            let (names, images) = containers(template);
            vec![
                name,
                json!(int(&status["desiredNumberScheduled"])),
                json!(int(&status["currentNumberScheduled"])),
                json!(int(&status["numberReady"])),
                json!(int(&status["updatedNumberScheduled"])),
                json!(int(&status["numberAvailable"])),
                json!(label_map(&template["spec"]["nodeSelector"])),
                age,
                names,
                images,
                selector(&spec["selector"]),
            ]
        }
        "StatefulSet" => {
            let (names, images) = containers(template);
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    int(&status["readyReplicas"]),
                    int(&spec["replicas"])
                )),
                age,
                names,
                images,
            ]
        }
        "Job" => {
            let (names, images) = containers(template);
            vec![
                name,
                json!(job_status(object)),
                json!(job_completions(spec, status)),
                json!(job_duration(status, now)),
                age,
                names,
                images,
                selector(&spec["selector"]),
            ]
        }
        "CronJob" => {
            let job_spec = &spec["jobTemplate"]["spec"];
            let (names, images) = containers(&job_spec["template"]);
            let last = if status["lastScheduleTime"].is_string() {
                since(&status["lastScheduleTime"], now)
            } else {
                "<none>".into()
            };
            let suspend = match spec["suspend"].as_bool() {
                Some(true) => "True",
                Some(false) => "False",
                None => "<unset>",
            };
            vec![
                name,
                json!(str_of(spec, &["schedule"])),
                json!(spec["timeZone"].as_str().unwrap_or("<none>")),
                json!(suspend),
                json!(array(status, &["active"]).len()),
                json!(last),
                age,
                names,
                images,
                selector(&job_spec["selector"]),
            ]
        }
        "ServiceAccount" => vec![name, json!(array(object, &["secrets"]).len()), age],
        "ControllerRevision" => vec![
            name,
            json!(controller_of(object)),
            json!(int(&object["revision"])),
            age,
        ],
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::resources::table;

    fn cells_of(kind: &str, object: Value) -> Vec<Value> {
        let now = parse_timestamp("2024-05-01T12:00:00Z").unwrap();
        let t = table(kind, &[object], "1", now);
        let names: Vec<&str> = t["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names.len(), t["rows"][0]["cells"].as_array().unwrap().len());
        t["rows"][0]["cells"].as_array().unwrap().clone()
    }

    fn created() -> Value {
        json!("2024-05-01T11:00:00Z")
    }

    #[test]
    fn deployments_print_ready_up_to_date_available_and_wide_columns() {
        let cells = cells_of(
            "Deployment",
            json!({
                "metadata": {"name": "web", "creationTimestamp": created()},
                "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                         "template": {"spec": {"containers": [{"name": "a", "image": "nginx:1"}, {"name": "b", "image": "busybox"}]}}},
                "status": {"readyReplicas": 2, "updatedReplicas": 3, "availableReplicas": 1}
            }),
        );
        assert_eq!(
            cells,
            [
                json!("web"),
                json!("2/3"),
                json!(3),
                json!(1),
                json!("60m"),
                json!("a,b"),
                json!("nginx:1,busybox"),
                json!("app=web")
            ]
        );
    }

    #[test]
    fn jobs_and_cronjobs_print_like_kube_apiserver() {
        let cells = cells_of(
            "Job",
            json!({
                "metadata": {"name": "pi", "creationTimestamp": created()},
                "spec": {"completions": 3, "parallelism": 1, "template": {"spec": {"containers": [{"name": "pi", "image": "perl"}]}}},
                "status": {"succeeded": 3, "startTime": "2024-05-01T11:00:00Z", "completionTime": "2024-05-01T11:00:42Z",
                           "conditions": [{"type": "Complete", "status": "True"}]}
            }),
        );
        assert_eq!(
            &cells[1..4],
            [json!("Complete"), json!("3/3"), json!("42s")]
        );
        assert_eq!(cells[7], json!("<none>"));
        let cells = cells_of(
            "CronJob",
            json!({
                "metadata": {"name": "tick", "creationTimestamp": created()},
                "spec": {"schedule": "*/5 * * * *", "suspend": false, "jobTemplate": {"spec": {"template": {"spec": {"containers": [{"name": "t", "image": "busybox"}]}}}}},
                "status": {}
            }),
        );
        assert_eq!(
            &cells[1..6],
            [
                json!("*/5 * * * *"),
                json!("<none>"),
                json!("False"),
                json!(0),
                json!("<none>")
            ]
        );
    }

    #[test]
    fn the_rest_print_their_columns() {
        let cells = cells_of(
            "DaemonSet",
            json!({"metadata": {"name": "d", "creationTimestamp": created()},
                   "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"spec": {"nodeSelector": {"role": "edge", "arch": "arm64"}, "containers": []}}},
                   "status": {"desiredNumberScheduled": 2, "numberReady": 1}}),
        );
        assert_eq!(
            &cells[1..7],
            [
                json!(2),
                json!(0),
                json!(1),
                json!(0),
                json!(0),
                json!("arch=arm64,role=edge")
            ]
        );
        let cells = cells_of(
            "StatefulSet",
            json!({"metadata": {"name": "s", "creationTimestamp": created()}, "spec": {"replicas": 2}, "status": {"readyReplicas": 1}}),
        );
        assert_eq!(cells[1], json!("1/2"));
        let cells = cells_of(
            "ServiceAccount",
            json!({"metadata": {"name": "default", "creationTimestamp": created()}}),
        );
        assert_eq!(cells[1], json!(0));
        let cells = cells_of(
            "ControllerRevision",
            json!({"metadata": {"name": "web-7b9", "creationTimestamp": created(),
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "web", "controller": true}]},
                   "revision": 2}),
        );
        assert_eq!(&cells[1..3], [json!("statefulset.apps/web"), json!(2)]);
        let cells = cells_of(
            "ReplicaSet",
            json!({"metadata": {"name": "r", "creationTimestamp": created()}, "spec": {"replicas": 4}, "status": {"replicas": 3, "readyReplicas": 2}}),
        );
        assert_eq!(&cells[1..4], [json!(4), json!(3), json!(2)]);
    }
}
