//! Domain types of the protocol and their conversions from and to the generated prost types.

use std::collections::BTreeMap;
use std::fmt;

use crate::pb;
use crate::pb::envelope::Body;

/// The version this build speaks. Peers with another major version are refused; the minor
/// says which optional messages a peer understands.
pub const PROTOCOL_VERSION: ProtocolVersion = ProtocolVersion { major: 1, minor: 4 };
/// The first minor version with `TokenRequest`/`TokenResponse`: an edge sends a token request
/// only to a cloud that speaks it (an older cloud would close the session on the unknown
/// message).
pub const TOKENS_SINCE_MINOR: u32 = 1;
/// The first minor version with `EventReport`: an edge sends events only to a cloud that speaks
/// it (an older cloud would close the session on the unknown message) and keeps them buffered
/// otherwise.
pub const EVENTS_SINCE_MINOR: u32 = 4;
/// Most events one `EventReport` may carry.
pub const MAX_EVENTS_PER_REPORT: usize = 256;
/// Largest event reason accepted (events.k8s.io's limit for `reason`).
pub const MAX_EVENT_REASON_LEN: usize = 128;
/// Largest event message accepted (events.k8s.io's limit for `note`); the edge cuts longer ones.
pub const MAX_EVENT_MESSAGE_LEN: usize = 1024;

/// Largest size accepted for short string fields (names, kinds, versions).
const MAX_NAME_LEN: usize = 253;
/// Largest node name a `JoinRequest` may carry: longer than any valid name (253), so that the
/// cloud can answer a name that is too long with a name error instead of a protocol violation.
pub const MAX_JOIN_NODE_NAME_LEN: usize = 4096;
/// Largest hostname accepted in `Hello` (Linux's `HOST_NAME_MAX` is 64).
pub const MAX_HOSTNAME_LEN: usize = 64;
/// Architectures an edge may report in `Hello`: Go's `GOARCH` names, which Kubernetes uses in
/// `kubernetes.io/arch`, and the Rust names of the same machines (an edge reports
/// `std::env::consts::ARCH` mapped to Go's where the names differ).
pub const KNOWN_ARCHITECTURES: &[&str] = &[
    "amd64",
    "arm64",
    "arm",
    "386",
    "ppc64le",
    "ppc64",
    "s390x",
    "riscv64",
    "mips64le",
    "mips64",
    "mipsle",
    "mips",
    "loong64",
    "x86_64",
    "aarch64",
    "x86",
    "powerpc64",
    "loongarch64",
];

/// Largest token audience accepted (audiences are often URLs, longer than a name).
pub const MAX_AUDIENCE_LEN: usize = 1024;
/// Largest service-account token accepted (a bound token is a JWT of about 1 KiB).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// A protobuf envelope decoded fine but does not make a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidMessage {
    #[error("envelope has no body or an unknown message type")]
    UnknownType,
    #[error("{message}: required field `{field}` is missing")]
    MissingField {
        message: &'static str,
        field: &'static str,
    },
    #[error("{message}: field `{field}` is {len} bytes, over the limit of {max}")]
    FieldTooLong {
        message: &'static str,
        field: &'static str,
        len: usize,
        max: usize,
    },
    /// The value is shown escaped and cut to 64 characters: it came from the network.
    #[error("{message}: field `{field}` has the invalid value {value}: {why}")]
    InvalidValue {
        message: &'static str,
        field: &'static str,
        value: String,
        why: &'static str,
    },
}

/// Why `name` is not a valid node name (a Kubernetes Node name: an RFC 1123 subdomain of at
/// most 253 characters), or `None` when it is one. Shared by the edge, which checks before it
/// dials, and the cloud, which checks every join.
pub fn node_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Some("it is longer than the limit of 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Some("each dot-separated part must be 1 to 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Some("only lowercase letters, digits, '-' and '.' are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Some("each part must start and end with a letter or digit");
        }
    }
    None
}

/// Whether `arch` is one of [`KNOWN_ARCHITECTURES`].
pub fn is_known_architecture(arch: &str) -> bool {
    KNOWN_ARCHITECTURES.contains(&arch)
}

/// Whether `text` could be a host name: letters, digits, `-`, `_` and `.`, 1 to
/// [`MAX_HOSTNAME_LEN`] bytes.
pub fn is_hostname(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= MAX_HOSTNAME_LEN
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Whether `text` is printable ASCII (space to `~`): version strings, kernel releases.
pub fn is_printable_ascii(text: &str) -> bool {
    text.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// A value from the network for an error message: Debug-quoted (control characters escaped),
/// its first 64 characters only.
fn shown(value: &str) -> String {
    const SHOWN: usize = 64;
    if value.chars().count() <= SHOWN {
        return format!("{value:?}");
    }
    let head: String = value.chars().take(SHOWN).collect();
    format!("{head:?}...")
}

fn checked(
    value: String,
    message: &'static str,
    field: &'static str,
    ok: fn(&str) -> bool,
    why: &'static str,
) -> Result<String, InvalidMessage> {
    if ok(&value) {
        return Ok(value);
    }
    Err(InvalidMessage::InvalidValue {
        message,
        field,
        value: shown(&value),
        why,
    })
}

/// The checks on `Hello`'s node info: everything here reaches a Node object and log lines.
/// An empty field is one the edge did not report; a reported one must be valid.
fn node_info_from(info: pb::NodeInfo) -> Result<NodeInfo, InvalidMessage> {
    const M: &str = "hello";
    let hostname = bounded(info.hostname, M, "node_info.hostname")?;
    let hostname = checked(
        hostname,
        M,
        "node_info.hostname",
        |h| h.is_empty() || is_hostname(h),
        "a hostname has at most 64 letters, digits, '-', '_' or '.'",
    )?;
    let os = checked(
        bounded(info.os, M, "node_info.os")?,
        M,
        "node_info.os",
        |os| {
            os.len() <= 32
                && os
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        },
        "an operating system is a GOOS name such as linux",
    )?;
    let arch = checked(
        bounded(info.arch, M, "node_info.arch")?,
        M,
        "node_info.arch",
        |arch| arch.is_empty() || is_known_architecture(arch),
        "an architecture is a GOARCH name such as amd64, arm64 or arm",
    )?;
    let kernel_version = checked(
        bounded(info.kernel_version, M, "node_info.kernel_version")?,
        M,
        "node_info.kernel_version",
        is_printable_ascii,
        "only printable ASCII is allowed",
    )?;
    let edgecore_version = checked(
        bounded(info.edgecore_version, M, "node_info.edgecore_version")?,
        M,
        "node_info.edgecore_version",
        is_printable_ascii,
        "only printable ASCII is allowed",
    )?;
    Ok(NodeInfo {
        hostname,
        os,
        arch,
        kernel_version,
        edgecore_version,
        cpus: info.cpus,
        memory_bytes: info.memory_bytes,
        node_status: info.node_status,
    })
}

/// A protocol version; compatible when the majors are equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtocolVersion {
    pub major: u32,
    pub minor: u32,
}

impl ProtocolVersion {
    /// Whether a peer speaking `self` can talk to this build.
    pub fn is_supported(self) -> bool {
        self.major == PROTOCOL_VERSION.major
    }

    /// Whether a peer speaking `self` understands `TokenRequest`/`TokenResponse`.
    pub fn has_tokens(self) -> bool {
        self.is_supported() && self.minor >= TOKENS_SINCE_MINOR
    }

    /// Whether a cloud speaking `self` accepts `EventReport`s.
    pub fn has_events(self) -> bool {
        self.is_supported() && self.minor >= EVENTS_SINCE_MINOR
    }

    /// Whether an edge speaking `self` accepts streams the cloud opens ([`crate::stream`]).
    pub fn has_streams(self) -> bool {
        self.is_supported() && self.minor >= crate::stream::STREAMS_SINCE_MINOR
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Facts about an edge gateway.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub kernel_version: String,
    pub edgecore_version: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    /// The Kubernetes `NodeStatus` (JSON) the edge reports, written when the session starts;
    /// empty from an edge that predates it.
    pub node_status: Vec<u8>,
}

/// The first message of a tunnel connection, edge to cloud.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: ProtocolVersion,
    pub node_info: NodeInfo,
    /// What the edge's store holds, for the cloud to send only the difference.
    pub inventory: Vec<HeldObject>,
    /// The cloud store identity the edge last synced with; empty if none (since 1.2).
    pub cloud_state_id: String,
}

/// One object the edge holds, by identity and version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldObject {
    pub object: ObjectRef,
    pub resource_version: u64,
}

/// The cloud's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloAck {
    pub version: ProtocolVersion,
    pub node_name: String,
    pub heartbeat_interval_ms: u64,
    pub dead_after_ms: u64,
    /// The cloud remembers no status of this node's objects: send the last ones again.
    pub resend_status: bool,
    /// The identity of the cloud's API store; empty from a cloud older than 1.2.
    pub cloud_state_id: String,
    /// The highest resourceVersion the cloud's API store has issued (0: unknown).
    pub cloud_revision: u64,
    /// An operator adopted this cloud state for the node: remember it and replace what differs.
    pub adopt_state: bool,
}

/// Why a request was refused; stable across versions, so peers can act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    Unspecified,
    UnsupportedVersion,
    TokenUnknown,
    TokenSecretMismatch,
    TokenExpired,
    TokenUsedUp,
    TokenRevoked,
    TokenNodeMismatch,
    TokenMalformed,
    NodeNameInvalid,
    NodeNameTaken,
    RateLimited,
    CsrInvalid,
    NodeRevoked,
    Unauthenticated,
    ProtocolViolation,
    Internal,
    Forbidden,
    NotSupported,
    StateMismatch,
    LabelsInvalid,
}

impl ErrorCode {
    /// A short snake_case name, used as a metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unspecified => "unspecified",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::TokenUnknown => "token_unknown",
            ErrorCode::TokenSecretMismatch => "token_secret_mismatch",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::TokenUsedUp => "token_used_up",
            ErrorCode::TokenRevoked => "token_revoked",
            ErrorCode::TokenNodeMismatch => "token_node_mismatch",
            ErrorCode::TokenMalformed => "token_malformed",
            ErrorCode::NodeNameInvalid => "node_name_invalid",
            ErrorCode::NodeNameTaken => "node_name_taken",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::CsrInvalid => "csr_invalid",
            ErrorCode::NodeRevoked => "node_revoked",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::ProtocolViolation => "protocol_violation",
            ErrorCode::Internal => "internal",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotSupported => "not_supported",
            ErrorCode::StateMismatch => "state_mismatch",
            ErrorCode::LabelsInvalid => "labels_invalid",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<pb::ErrorCode> for ErrorCode {
    fn from(code: pb::ErrorCode) -> Self {
        use pb::ErrorCode as P;
        match code {
            P::Unspecified => ErrorCode::Unspecified,
            P::UnsupportedVersion => ErrorCode::UnsupportedVersion,
            P::TokenUnknown => ErrorCode::TokenUnknown,
            P::TokenSecretMismatch => ErrorCode::TokenSecretMismatch,
            P::TokenExpired => ErrorCode::TokenExpired,
            P::TokenUsedUp => ErrorCode::TokenUsedUp,
            P::TokenRevoked => ErrorCode::TokenRevoked,
            P::TokenNodeMismatch => ErrorCode::TokenNodeMismatch,
            P::TokenMalformed => ErrorCode::TokenMalformed,
            P::NodeNameInvalid => ErrorCode::NodeNameInvalid,
            P::NodeNameTaken => ErrorCode::NodeNameTaken,
            P::RateLimited => ErrorCode::RateLimited,
            P::CsrInvalid => ErrorCode::CsrInvalid,
            P::NodeRevoked => ErrorCode::NodeRevoked,
            P::Unauthenticated => ErrorCode::Unauthenticated,
            P::ProtocolViolation => ErrorCode::ProtocolViolation,
            P::Internal => ErrorCode::Internal,
            P::Forbidden => ErrorCode::Forbidden,
            P::NotSupported => ErrorCode::NotSupported,
            P::StateMismatch => ErrorCode::StateMismatch,
            P::LabelsInvalid => ErrorCode::LabelsInvalid,
        }
    }
}

impl From<ErrorCode> for pb::ErrorCode {
    fn from(code: ErrorCode) -> Self {
        use pb::ErrorCode as P;
        match code {
            ErrorCode::Unspecified => P::Unspecified,
            ErrorCode::UnsupportedVersion => P::UnsupportedVersion,
            ErrorCode::TokenUnknown => P::TokenUnknown,
            ErrorCode::TokenSecretMismatch => P::TokenSecretMismatch,
            ErrorCode::TokenExpired => P::TokenExpired,
            ErrorCode::TokenUsedUp => P::TokenUsedUp,
            ErrorCode::TokenRevoked => P::TokenRevoked,
            ErrorCode::TokenNodeMismatch => P::TokenNodeMismatch,
            ErrorCode::TokenMalformed => P::TokenMalformed,
            ErrorCode::NodeNameInvalid => P::NodeNameInvalid,
            ErrorCode::NodeNameTaken => P::NodeNameTaken,
            ErrorCode::RateLimited => P::RateLimited,
            ErrorCode::CsrInvalid => P::CsrInvalid,
            ErrorCode::NodeRevoked => P::NodeRevoked,
            ErrorCode::Unauthenticated => P::Unauthenticated,
            ErrorCode::ProtocolViolation => P::ProtocolViolation,
            ErrorCode::Internal => P::Internal,
            ErrorCode::Forbidden => P::Forbidden,
            ErrorCode::NotSupported => P::NotSupported,
            ErrorCode::StateMismatch => P::StateMismatch,
            ErrorCode::LabelsInvalid => P::LabelsInvalid,
        }
    }
}

/// A refusal with its reason, sent before the sender closes the stream or connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMessage {
    pub code: ErrorCode,
    pub message: String,
}

impl fmt::Display for ErrorMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

/// Identity of a Kubernetes object as the edge stores it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// Create or replace an object on the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectUpsert {
    pub seq: u64,
    pub object: ObjectRef,
    pub resource_version: u64,
    pub body: Vec<u8>,
}

/// Remove an object from the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectDelete {
    pub seq: u64,
    pub object: ObjectRef,
    pub resource_version: u64,
}

/// Status of an object owned by the reporting edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    pub seq: u64,
    pub object: ObjectRef,
    pub generation: u64,
    pub status: Vec<u8>,
}

/// Token plus CSR; the only message accepted on a connection without a client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinRequest {
    pub version: ProtocolVersion,
    pub token: String,
    pub node_name: String,
    pub csr_der: Vec<u8>,
    pub labels: BTreeMap<String, String>,
}

impl JoinRequest {
    /// The public id part of the token (before the dot); safe to log, unlike the secret.
    /// `(malformed)` unless it has a token id's shape (6 characters of `[a-z0-9]`), so that
    /// neither a secret pasted without its id nor hostile text reaches a log as an id.
    pub fn token_id(&self) -> &str {
        match self.token.split_once('.') {
            Some((id, _))
                if id.len() == 6
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) =>
            {
                id
            }
            _ => "(malformed)",
        }
    }
}

/// The signed node certificate and the cluster CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinResponse {
    pub certificate_der: Vec<u8>,
    pub ca_der: Vec<u8>,
}

/// The edge asks for a bound service-account token for a pod bound to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// Chosen by the edge, echoed in the [`TokenResponse`].
    pub request_id: u64,
    /// The pod (kind `Pod`, with its uid).
    pub pod: ObjectRef,
    /// The pod's service account.
    pub service_account: String,
    /// The projected source's audience; empty for the API server's default audiences.
    pub audience: String,
    /// The projected source's `expirationSeconds`.
    pub expiration_seconds: u64,
}

/// A token the API issued. `Debug` leaves the token out, so logging a message never leaks it.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedToken {
    /// The JWT.
    pub token: String,
    /// When the API server stops accepting it, Unix seconds.
    pub expires_at_unix: i64,
    /// Its lifetime as granted (expiry minus the cloud's time of issue).
    pub lifetime_seconds: u64,
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedToken")
            .field("token", &format_args!("<{} bytes>", self.token.len()))
            .field("expires_at_unix", &self.expires_at_unix)
            .field("lifetime_seconds", &self.lifetime_seconds)
            .finish()
    }
}

/// The cloud's answer to a [`TokenRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenResponse {
    pub request_id: u64,
    /// The token, or why there is none.
    pub result: Result<IssuedToken, ErrorMessage>,
}

/// `Normal` or `Warning`, an event's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    /// The type as Kubernetes writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// An event about one of the edge's pods or its Node, with the occurrences the edge counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeEvent {
    /// The Pod (with its uid) or the Node.
    pub object: ObjectRef,
    /// The involved object's `fieldPath` (`spec.containers{app}`), empty for the whole object.
    pub field_path: String,
    pub type_: EventType,
    pub reason: String,
    pub message: String,
    /// At least 1.
    pub count: u32,
    /// Unix milliseconds of the first and the last occurrence.
    pub first_timestamp_ms: i64,
    pub last_timestamp_ms: i64,
}

/// One message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    HelloAck(HelloAck),
    Error(ErrorMessage),
    Heartbeat {
        seq: u64,
    },
    Upsert(ObjectUpsert),
    Delete(ObjectDelete),
    Ack {
        seqs: Vec<u64>,
    },
    Request(ObjectRef),
    /// The edge finished a pod's graceful deletion; `seq` is acknowledged once it is gone.
    PodDeleted {
        seq: u64,
        object: ObjectRef,
    },
    Status(StatusReport),
    JoinRequest(JoinRequest),
    JoinResponse(JoinResponse),
    RenewRequest {
        csr_der: Vec<u8>,
    },
    RenewResponse {
        certificate_der: Vec<u8>,
    },
    TokenRequest(TokenRequest),
    TokenResponse(TokenResponse),
    /// Best-effort events from the edge (since 1.4); never acknowledged.
    Events(Vec<EdgeEvent>),
}

impl Message {
    /// The message type's name, for logs and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::HelloAck(_) => "hello_ack",
            Message::Error(_) => "error",
            Message::Heartbeat { .. } => "heartbeat",
            Message::Upsert(_) => "upsert",
            Message::Delete(_) => "delete",
            Message::Ack { .. } => "ack",
            Message::Request(_) => "request",
            Message::PodDeleted { .. } => "pod_deleted",
            Message::Status(_) => "status",
            Message::JoinRequest(_) => "join_request",
            Message::JoinResponse(_) => "join_response",
            Message::RenewRequest { .. } => "renew_request",
            Message::RenewResponse { .. } => "renew_response",
            Message::TokenRequest(_) => "token_request",
            Message::TokenResponse(_) => "token_response",
            Message::Events(_) => "events",
        }
    }

    /// Shorthand for an error message.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Message::Error(ErrorMessage {
            code,
            message: message.into(),
        })
    }
}

fn required<T>(
    value: Option<T>,
    message: &'static str,
    field: &'static str,
) -> Result<T, InvalidMessage> {
    value.ok_or(InvalidMessage::MissingField { message, field })
}

fn bounded(
    value: String,
    message: &'static str,
    field: &'static str,
) -> Result<String, InvalidMessage> {
    bounded_to(value, MAX_NAME_LEN, message, field)
}

fn bounded_to(
    value: String,
    max: usize,
    message: &'static str,
    field: &'static str,
) -> Result<String, InvalidMessage> {
    if value.len() > max {
        return Err(InvalidMessage::FieldTooLong {
            message,
            field,
            len: value.len(),
            max,
        });
    }
    Ok(value)
}

fn non_empty(
    value: String,
    message: &'static str,
    field: &'static str,
) -> Result<String, InvalidMessage> {
    if value.is_empty() {
        return Err(InvalidMessage::MissingField { message, field });
    }
    Ok(value)
}

fn error_from(e: pb::Error) -> ErrorMessage {
    ErrorMessage {
        // An error code this build does not know is still an error: keep the text.
        code: pb::ErrorCode::try_from(e.code)
            .map(ErrorCode::from)
            .unwrap_or(ErrorCode::Unspecified),
        message: e.message,
    }
}

fn token_request_from(r: pb::TokenRequest) -> Result<TokenRequest, InvalidMessage> {
    const M: &str = "token_request";
    let pod = object_from(r.pod, M)?;
    if pod.kind != "Pod" {
        return Err(InvalidMessage::MissingField {
            message: M,
            field: "pod.kind = Pod",
        });
    }
    if pod.uid.is_empty() {
        return Err(InvalidMessage::MissingField {
            message: M,
            field: "pod.uid",
        });
    }
    if r.expiration_seconds == 0 {
        return Err(InvalidMessage::MissingField {
            message: M,
            field: "expiration_seconds",
        });
    }
    Ok(TokenRequest {
        request_id: r.request_id,
        pod,
        service_account: bounded(
            non_empty(r.service_account, M, "service_account")?,
            M,
            "service_account",
        )?,
        audience: bounded_to(r.audience, MAX_AUDIENCE_LEN, M, "audience")?,
        expiration_seconds: r.expiration_seconds,
    })
}

fn token_response_from(r: pb::TokenResponse) -> Result<TokenResponse, InvalidMessage> {
    const M: &str = "token_response";
    let result = match r.error {
        Some(e) => Err(error_from(e)),
        None => Ok(IssuedToken {
            token: bounded_to(non_empty(r.token, M, "token")?, MAX_TOKEN_LEN, M, "token")?,
            expires_at_unix: r.expires_at_unix,
            lifetime_seconds: r.lifetime_seconds,
        }),
    };
    Ok(TokenResponse {
        request_id: r.request_id,
        result,
    })
}

fn edge_event_from(e: pb::EdgeEvent) -> Result<EdgeEvent, InvalidMessage> {
    const M: &str = "events";
    let object = object_from(e.object, M)?;
    let type_ = match e.r#type.as_str() {
        "Normal" => EventType::Normal,
        "Warning" => EventType::Warning,
        other => {
            return Err(InvalidMessage::InvalidValue {
                message: M,
                field: "type",
                value: shown(other),
                why: "an event type is Normal or Warning",
            });
        }
    };
    if e.count == 0 {
        return Err(InvalidMessage::MissingField {
            message: M,
            field: "count",
        });
    }
    Ok(EdgeEvent {
        object,
        field_path: bounded(e.field_path, M, "field_path")?,
        type_,
        reason: checked(
            bounded_to(
                non_empty(e.reason, M, "reason")?,
                MAX_EVENT_REASON_LEN,
                M,
                "reason",
            )?,
            M,
            "reason",
            is_printable_ascii,
            "only printable ASCII is allowed",
        )?,
        message: bounded_to(e.message, MAX_EVENT_MESSAGE_LEN, M, "message")?,
        count: e.count,
        first_timestamp_ms: e.first_timestamp_ms,
        last_timestamp_ms: e.last_timestamp_ms,
    })
}

fn version_from(
    v: Option<pb::ProtocolVersion>,
    message: &'static str,
) -> Result<ProtocolVersion, InvalidMessage> {
    let v = required(v, message, "version")?;
    Ok(ProtocolVersion {
        major: v.major,
        minor: v.minor,
    })
}

fn version_to(v: ProtocolVersion) -> Option<pb::ProtocolVersion> {
    Some(pb::ProtocolVersion {
        major: v.major,
        minor: v.minor,
    })
}

fn object_from(
    o: Option<pb::ObjectRef>,
    message: &'static str,
) -> Result<ObjectRef, InvalidMessage> {
    let o = required(o, message, "object")?;
    if o.kind.is_empty() {
        return Err(InvalidMessage::MissingField {
            message,
            field: "object.kind",
        });
    }
    if o.name.is_empty() {
        return Err(InvalidMessage::MissingField {
            message,
            field: "object.name",
        });
    }
    Ok(ObjectRef {
        kind: bounded(o.kind, message, "object.kind")?,
        namespace: bounded(o.namespace, message, "object.namespace")?,
        name: bounded(o.name, message, "object.name")?,
        uid: bounded(o.uid, message, "object.uid")?,
    })
}

fn object_to(o: ObjectRef) -> Option<pb::ObjectRef> {
    Some(pb::ObjectRef {
        kind: o.kind,
        namespace: o.namespace,
        name: o.name,
        uid: o.uid,
    })
}

impl TryFrom<pb::Envelope> for Message {
    type Error = InvalidMessage;

    fn try_from(envelope: pb::Envelope) -> Result<Self, InvalidMessage> {
        let body = envelope.body.ok_or(InvalidMessage::UnknownType)?;
        Ok(match body {
            Body::Hello(h) => {
                let info = required(h.node_info, "hello", "node_info")?;
                Message::Hello(Hello {
                    version: version_from(h.version, "hello")?,
                    node_info: node_info_from(info)?,
                    inventory: h
                        .inventory
                        .into_iter()
                        .map(|held| {
                            Ok(HeldObject {
                                object: object_from(held.object, "hello.inventory")?,
                                resource_version: held.resource_version,
                            })
                        })
                        .collect::<Result<_, InvalidMessage>>()?,
                    cloud_state_id: bounded(h.cloud_state_id, "hello", "cloud_state_id")?,
                })
            }
            Body::HelloAck(a) => Message::HelloAck(HelloAck {
                version: version_from(a.version, "hello_ack")?,
                node_name: bounded(a.node_name, "hello_ack", "node_name")?,
                heartbeat_interval_ms: a.heartbeat_interval_ms,
                dead_after_ms: a.dead_after_ms,
                resend_status: a.resend_status,
                cloud_state_id: bounded(a.cloud_state_id, "hello_ack", "cloud_state_id")?,
                cloud_revision: a.cloud_revision,
                adopt_state: a.adopt_state,
            }),
            Body::Error(e) => Message::Error(error_from(e)),
            Body::Heartbeat(h) => Message::Heartbeat { seq: h.seq },
            Body::Upsert(u) => Message::Upsert(ObjectUpsert {
                seq: u.seq,
                object: object_from(u.object, "upsert")?,
                resource_version: u.resource_version,
                body: u.body,
            }),
            Body::Delete(d) => Message::Delete(ObjectDelete {
                seq: d.seq,
                object: object_from(d.object, "delete")?,
                resource_version: d.resource_version,
            }),
            Body::Ack(a) => Message::Ack { seqs: a.seqs },
            Body::Request(r) => Message::Request(object_from(r.object, "request")?),
            Body::PodDeleted(d) => Message::PodDeleted {
                seq: d.seq,
                object: object_from(d.object, "pod_deleted")?,
            },
            Body::Status(s) => Message::Status(StatusReport {
                seq: s.seq,
                object: object_from(s.object, "status")?,
                generation: s.generation,
                status: s.status,
            }),
            Body::JoinRequest(j) => Message::JoinRequest(JoinRequest {
                version: version_from(j.version, "join_request")?,
                token: bounded(j.token, "join_request", "token")?,
                // Checked by the cloud's join admission, which answers with a name error.
                node_name: bounded_to(
                    j.node_name,
                    MAX_JOIN_NODE_NAME_LEN,
                    "join_request",
                    "node_name",
                )?,
                csr_der: j.csr_der,
                labels: j.labels.into_iter().collect(),
            }),
            Body::JoinResponse(j) => Message::JoinResponse(JoinResponse {
                certificate_der: j.certificate_der,
                ca_der: j.ca_der,
            }),
            Body::RenewRequest(r) => Message::RenewRequest { csr_der: r.csr_der },
            Body::RenewResponse(r) => Message::RenewResponse {
                certificate_der: r.certificate_der,
            },
            Body::TokenRequest(r) => Message::TokenRequest(token_request_from(r)?),
            Body::TokenResponse(r) => Message::TokenResponse(token_response_from(r)?),
            Body::Events(r) => {
                if r.events.len() > MAX_EVENTS_PER_REPORT {
                    return Err(InvalidMessage::FieldTooLong {
                        message: "events",
                        field: "events",
                        len: r.events.len(),
                        max: MAX_EVENTS_PER_REPORT,
                    });
                }
                Message::Events(
                    r.events
                        .into_iter()
                        .map(edge_event_from)
                        .collect::<Result<_, _>>()?,
                )
            }
        })
    }
}

impl From<Message> for pb::Envelope {
    fn from(message: Message) -> Self {
        let body = match message {
            Message::Hello(h) => Body::Hello(pb::Hello {
                version: version_to(h.version),
                node_info: Some(pb::NodeInfo {
                    hostname: h.node_info.hostname,
                    os: h.node_info.os,
                    arch: h.node_info.arch,
                    kernel_version: h.node_info.kernel_version,
                    edgecore_version: h.node_info.edgecore_version,
                    cpus: h.node_info.cpus,
                    memory_bytes: h.node_info.memory_bytes,
                    node_status: h.node_info.node_status,
                }),
                inventory: h
                    .inventory
                    .into_iter()
                    .map(|held| pb::HeldObject {
                        object: object_to(held.object),
                        resource_version: held.resource_version,
                    })
                    .collect(),
                cloud_state_id: h.cloud_state_id,
            }),
            Message::HelloAck(a) => Body::HelloAck(pb::HelloAck {
                version: version_to(a.version),
                node_name: a.node_name,
                heartbeat_interval_ms: a.heartbeat_interval_ms,
                dead_after_ms: a.dead_after_ms,
                resend_status: a.resend_status,
                cloud_state_id: a.cloud_state_id,
                cloud_revision: a.cloud_revision,
                adopt_state: a.adopt_state,
            }),
            Message::Error(e) => Body::Error(pb::Error {
                code: pb::ErrorCode::from(e.code) as i32,
                message: e.message,
            }),
            Message::Heartbeat { seq } => Body::Heartbeat(pb::Heartbeat { seq }),
            Message::Upsert(u) => Body::Upsert(pb::ObjectUpsert {
                seq: u.seq,
                object: object_to(u.object),
                resource_version: u.resource_version,
                body: u.body,
            }),
            Message::Delete(d) => Body::Delete(pb::ObjectDelete {
                seq: d.seq,
                object: object_to(d.object),
                resource_version: d.resource_version,
            }),
            Message::Ack { seqs } => Body::Ack(pb::Ack { seqs }),
            Message::Request(object) => Body::Request(pb::ObjectRequest {
                object: object_to(object),
            }),
            Message::PodDeleted { seq, object } => Body::PodDeleted(pb::PodDeleted {
                seq,
                object: object_to(object),
            }),
            Message::Status(s) => Body::Status(pb::StatusReport {
                seq: s.seq,
                object: object_to(s.object),
                generation: s.generation,
                status: s.status,
            }),
            Message::JoinRequest(j) => Body::JoinRequest(pb::JoinRequest {
                version: version_to(j.version),
                token: j.token,
                node_name: j.node_name,
                csr_der: j.csr_der,
                labels: j.labels.into_iter().collect(),
            }),
            Message::JoinResponse(j) => Body::JoinResponse(pb::JoinResponse {
                certificate_der: j.certificate_der,
                ca_der: j.ca_der,
            }),
            Message::RenewRequest { csr_der } => Body::RenewRequest(pb::RenewRequest { csr_der }),
            Message::RenewResponse { certificate_der } => {
                Body::RenewResponse(pb::RenewResponse { certificate_der })
            }
            Message::TokenRequest(r) => Body::TokenRequest(pb::TokenRequest {
                request_id: r.request_id,
                pod: object_to(r.pod),
                service_account: r.service_account,
                audience: r.audience,
                expiration_seconds: r.expiration_seconds,
            }),
            Message::TokenResponse(r) => Body::TokenResponse(match r.result {
                Ok(issued) => pb::TokenResponse {
                    request_id: r.request_id,
                    token: issued.token,
                    expires_at_unix: issued.expires_at_unix,
                    lifetime_seconds: issued.lifetime_seconds,
                    error: None,
                },
                Err(e) => pb::TokenResponse {
                    request_id: r.request_id,
                    error: Some(pb::Error {
                        code: pb::ErrorCode::from(e.code) as i32,
                        message: e.message,
                    }),
                    ..Default::default()
                },
            }),
            Message::Events(events) => Body::Events(pb::EventReport {
                events: events
                    .into_iter()
                    .map(|e| pb::EdgeEvent {
                        object: object_to(e.object),
                        field_path: e.field_path,
                        r#type: e.type_.as_str().to_string(),
                        reason: e.reason,
                        message: e.message,
                        count: e.count,
                        first_timestamp_ms: e.first_timestamp_ms,
                        last_timestamp_ms: e.last_timestamp_ms,
                    })
                    .collect(),
            }),
        };
        pb::Envelope { body: Some(body) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_messages() -> Vec<Message> {
        let object = ObjectRef {
            kind: "Pod".into(),
            namespace: "default".into(),
            name: "web".into(),
            uid: "u-1".into(),
        };
        vec![
            Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                node_info: NodeInfo {
                    hostname: "gw-1".into(),
                    cpus: 4,
                    memory_bytes: 1 << 30,
                    node_status: br#"{"nodeInfo":{"osImage":"Debian"}}"#.to_vec(),
                    ..NodeInfo::default()
                },
                inventory: vec![HeldObject {
                    object: object.clone(),
                    resource_version: 41,
                }],
                cloud_state_id: "5f0c-kube-system-uid".into(),
            }),
            Message::HelloAck(HelloAck {
                version: PROTOCOL_VERSION,
                node_name: "gw-1".into(),
                heartbeat_interval_ms: 10_000,
                dead_after_ms: 30_000,
                resend_status: true,
                cloud_state_id: "5f0c-kube-system-uid".into(),
                cloud_revision: 1_000_000_042,
                adopt_state: true,
            }),
            Message::error(ErrorCode::TokenExpired, "token abcdef expired"),
            Message::Heartbeat { seq: 7 },
            Message::Upsert(ObjectUpsert {
                seq: 1,
                object: object.clone(),
                resource_version: 42,
                body: b"{}".to_vec(),
            }),
            Message::Delete(ObjectDelete {
                seq: 2,
                object: object.clone(),
                resource_version: 43,
            }),
            Message::Ack { seqs: vec![2, 5] },
            Message::Request(object.clone()),
            Message::PodDeleted {
                seq: 4,
                object: object.clone(),
            },
            Message::Status(StatusReport {
                seq: 3,
                object,
                generation: 9,
                status: b"{\"phase\":\"Running\"}".to_vec(),
            }),
            Message::JoinRequest(JoinRequest {
                version: PROTOCOL_VERSION,
                token: "abcdef.0123456789abcdef".into(),
                node_name: "gw-1".into(),
                csr_der: vec![1, 2, 3],
                labels: [("zone".to_string(), "a".to_string())].into(),
            }),
            Message::JoinResponse(JoinResponse {
                certificate_der: vec![4],
                ca_der: vec![5],
            }),
            Message::RenewRequest { csr_der: vec![6] },
            Message::RenewResponse {
                certificate_der: vec![7],
            },
            Message::TokenRequest(token_request()),
            Message::TokenResponse(TokenResponse {
                request_id: 8,
                result: Ok(IssuedToken {
                    token: "eyJhbGciOi.x.y".into(),
                    expires_at_unix: 1_800_000_000,
                    lifetime_seconds: 3600,
                }),
            }),
            Message::Events(vec![EdgeEvent {
                object: ObjectRef {
                    kind: "Pod".into(),
                    namespace: "default".into(),
                    name: "web".into(),
                    uid: "u-1".into(),
                },
                field_path: "spec.containers{app}".into(),
                type_: EventType::Warning,
                reason: "BackOff".into(),
                message: "Back-off pulling image \"missing:1\"".into(),
                count: 3,
                first_timestamp_ms: 1_800_000_000_000,
                last_timestamp_ms: 1_800_000_020_000,
            }]),
            Message::TokenResponse(TokenResponse {
                request_id: 9,
                result: Err(ErrorMessage {
                    code: ErrorCode::NotSupported,
                    message: "the embedded control plane cannot issue service-account tokens"
                        .into(),
                }),
            }),
        ]
    }

    fn token_request() -> TokenRequest {
        TokenRequest {
            request_id: 8,
            pod: ObjectRef {
                kind: "Pod".into(),
                namespace: "default".into(),
                name: "web".into(),
                uid: "u-1".into(),
            },
            service_account: "default".into(),
            audience: String::new(),
            expiration_seconds: 3607,
        }
    }

    fn token_request_envelope(change: impl FnOnce(&mut pb::TokenRequest)) -> pb::Envelope {
        let mut envelope = pb::Envelope::from(Message::TokenRequest(token_request()));
        let Some(Body::TokenRequest(r)) = envelope.body.as_mut() else {
            unreachable!("built from a token request")
        };
        change(r);
        envelope
    }

    #[test]
    fn token_requests_need_a_pod_with_uid_a_service_account_and_a_lifetime() {
        type Change = fn(&mut pb::TokenRequest);
        let cases: [(Change, InvalidMessage); 5] = [
            (
                |r| r.pod = None,
                InvalidMessage::MissingField {
                    message: "token_request",
                    field: "object",
                },
            ),
            (
                |r| r.pod.as_mut().unwrap().kind = "Secret".into(),
                InvalidMessage::MissingField {
                    message: "token_request",
                    field: "pod.kind = Pod",
                },
            ),
            (
                |r| r.pod.as_mut().unwrap().uid.clear(),
                InvalidMessage::MissingField {
                    message: "token_request",
                    field: "pod.uid",
                },
            ),
            (
                |r| r.service_account.clear(),
                InvalidMessage::MissingField {
                    message: "token_request",
                    field: "service_account",
                },
            ),
            (
                |r| r.expiration_seconds = 0,
                InvalidMessage::MissingField {
                    message: "token_request",
                    field: "expiration_seconds",
                },
            ),
        ];
        for (change, expected) in cases {
            assert_eq!(
                Message::try_from(token_request_envelope(change)),
                Err(expected)
            );
        }
    }

    #[test]
    fn token_fields_are_capped() {
        let long_audience = token_request_envelope(|r| r.audience = "a".repeat(2000));
        assert!(matches!(
            Message::try_from(long_audience),
            Err(InvalidMessage::FieldTooLong {
                field: "audience",
                len: 2000,
                max: MAX_AUDIENCE_LEN,
                ..
            })
        ));
        let url = token_request_envelope(|r| r.audience = format!("https://{}", "v".repeat(400)));
        assert!(Message::try_from(url).is_ok(), "audiences may exceed 253");
        let huge = pb::Envelope {
            body: Some(Body::TokenResponse(pb::TokenResponse {
                request_id: 1,
                token: "t".repeat(MAX_TOKEN_LEN + 1),
                ..Default::default()
            })),
        };
        assert!(matches!(
            Message::try_from(huge),
            Err(InvalidMessage::FieldTooLong { field: "token", .. })
        ));
        let empty = pb::Envelope {
            body: Some(Body::TokenResponse(pb::TokenResponse::default())),
        };
        assert_eq!(
            Message::try_from(empty),
            Err(InvalidMessage::MissingField {
                message: "token_response",
                field: "token"
            })
        );
    }

    #[test]
    fn issued_tokens_never_show_in_debug_output() {
        let message = Message::TokenResponse(TokenResponse {
            request_id: 1,
            result: Ok(IssuedToken {
                token: "secret-jwt".into(),
                expires_at_unix: 0,
                lifetime_seconds: 600,
            }),
        });
        let shown = format!("{message:?}");
        assert!(!shown.contains("secret-jwt"), "{shown}");
        assert!(shown.contains("<10 bytes>"), "{shown}");
    }

    #[test]
    fn every_message_round_trips_through_protobuf() {
        for message in sample_messages() {
            let envelope = pb::Envelope::from(message.clone());
            let back = Message::try_from(envelope).expect("valid message");
            assert_eq!(back, message);
        }
    }

    #[test]
    fn empty_envelope_is_an_unknown_type() {
        assert_eq!(
            Message::try_from(pb::Envelope { body: None }),
            Err(InvalidMessage::UnknownType)
        );
    }

    #[test]
    fn hello_without_version_is_rejected_naming_the_field() {
        let envelope = pb::Envelope {
            body: Some(Body::Hello(pb::Hello {
                version: None,
                node_info: Some(pb::NodeInfo::default()),
                inventory: Vec::new(),
                cloud_state_id: String::new(),
            })),
        };
        let err = Message::try_from(envelope).unwrap_err();
        assert_eq!(
            err.to_string(),
            "hello: required field `version` is missing"
        );
    }

    #[test]
    fn upsert_without_object_name_is_rejected() {
        let envelope = pb::Envelope {
            body: Some(Body::Upsert(pb::ObjectUpsert {
                object: Some(pb::ObjectRef {
                    kind: "Pod".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })),
        };
        assert_eq!(
            Message::try_from(envelope),
            Err(InvalidMessage::MissingField {
                message: "upsert",
                field: "object.name"
            })
        );
    }

    #[test]
    fn join_node_names_reach_the_cloud_up_to_their_own_limit() {
        let join = |len: usize| pb::Envelope {
            body: Some(Body::JoinRequest(pb::JoinRequest {
                version: version_to(PROTOCOL_VERSION),
                node_name: "x".repeat(len),
                ..Default::default()
            })),
        };
        // Too long for a node name, but the cloud's join admission answers that.
        assert!(Message::try_from(join(300)).is_ok());
        assert!(matches!(
            Message::try_from(join(MAX_JOIN_NODE_NAME_LEN + 1)),
            Err(InvalidMessage::FieldTooLong {
                field: "node_name",
                ..
            })
        ));
    }

    fn hello_with(info: pb::NodeInfo) -> pb::Envelope {
        pb::Envelope {
            body: Some(Body::Hello(pb::Hello {
                version: version_to(PROTOCOL_VERSION),
                node_info: Some(info),
                inventory: Vec::new(),
                cloud_state_id: String::new(),
            })),
        }
    }

    fn good_info() -> pb::NodeInfo {
        pb::NodeInfo {
            hostname: "gw-1.factory".into(),
            os: "linux".into(),
            arch: "arm64".into(),
            kernel_version: "6.8.0-49-generic".into(),
            edgecore_version: "0.1.0".into(),
            ..Default::default()
        }
    }

    #[test]
    fn hello_node_info_is_validated_field_by_field() {
        assert!(Message::try_from(hello_with(good_info())).is_ok());
        // Fields an edge does not report stay empty.
        assert!(Message::try_from(hello_with(pb::NodeInfo::default())).is_ok());
        type Change = fn(&mut pb::NodeInfo);
        let cases: [(Change, &str); 8] = [
            (
                |i| i.hostname = "gw\n2026-12-04T18:30:00Z INFO forged".into(),
                "node_info.hostname",
            ),
            (|i| i.hostname = "gw 1".into(), "node_info.hostname"),
            (|i| i.hostname = "h".repeat(65), "node_info.hostname"),
            (|i| i.arch = "amd64\u{1b}[2J".into(), "node_info.arch"),
            (|i| i.arch = "pdp11".into(), "node_info.arch"),
            (|i| i.os = "Linux".into(), "node_info.os"),
            (
                |i| i.kernel_version = "6.8\r\n".into(),
                "node_info.kernel_version",
            ),
            (
                |i| i.edgecore_version = "0.1\u{202e}".into(),
                "node_info.edgecore_version",
            ),
        ];
        for (change, want) in cases {
            let mut info = good_info();
            change(&mut info);
            let e = Message::try_from(hello_with(info)).expect_err(want);
            let InvalidMessage::InvalidValue { field, .. } = &e else {
                panic!("{want}: {e:?}");
            };
            assert_eq!(*field, want);
            let text = e.to_string();
            assert!(text.contains(want), "{text}");
            assert!(!text.chars().any(|c| c.is_control()), "{text:?}");
        }
    }

    #[test]
    fn token_id_is_only_an_id_shaped_prefix() {
        let join = |token: &str| JoinRequest {
            version: PROTOCOL_VERSION,
            token: token.into(),
            node_name: "gw".into(),
            csr_der: Vec::new(),
            labels: BTreeMap::new(),
        };
        assert_eq!(join("abcdef.0123456789abcdef").token_id(), "abcdef");
        assert_eq!(join("0123456789abcdef").token_id(), "(malformed)");
        assert_eq!(join("ab\ncd.x").token_id(), "(malformed)");
    }

    #[test]
    fn unknown_error_code_keeps_the_text() {
        let envelope = pb::Envelope {
            body: Some(Body::Error(pb::Error {
                code: 999,
                message: "future reason".into(),
            })),
        };
        assert_eq!(
            Message::try_from(envelope),
            Ok(Message::error(ErrorCode::Unspecified, "future reason"))
        );
    }

    #[test]
    fn version_support_is_by_major() {
        assert!(ProtocolVersion { major: 1, minor: 9 }.is_supported());
        assert!(!ProtocolVersion { major: 2, minor: 0 }.is_supported());
        assert!(!ProtocolVersion { major: 0, minor: 1 }.is_supported());
    }

    #[test]
    fn events_need_minor_4() {
        assert!(PROTOCOL_VERSION.has_events());
        assert!(!ProtocolVersion { major: 1, minor: 3 }.has_events());
        assert!(!ProtocolVersion { major: 2, minor: 4 }.has_events());
    }

    #[test]
    fn bad_events_are_refused_naming_the_field() {
        let event = |f: &dyn Fn(&mut pb::EdgeEvent)| {
            let mut e = pb::EdgeEvent {
                object: object_to(ObjectRef {
                    kind: "Pod".into(),
                    namespace: "default".into(),
                    name: "web".into(),
                    uid: "u-1".into(),
                }),
                field_path: String::new(),
                r#type: "Warning".into(),
                reason: "BackOff".into(),
                message: "m".into(),
                count: 1,
                first_timestamp_ms: 1,
                last_timestamp_ms: 1,
            };
            f(&mut e);
            Message::try_from(pb::Envelope {
                body: Some(Body::Events(pb::EventReport { events: vec![e] })),
            })
        };
        assert!(event(&|_| {}).is_ok());
        let field = |r: Result<Message, InvalidMessage>| match r {
            Err(InvalidMessage::InvalidValue { field, .. })
            | Err(InvalidMessage::MissingField { field, .. })
            | Err(InvalidMessage::FieldTooLong { field, .. }) => field,
            other => panic!("not refused: {other:?}"),
        };
        assert_eq!(field(event(&|e| e.r#type = "Fatal".into())), "type");
        assert_eq!(field(event(&|e| e.count = 0)), "count");
        assert_eq!(field(event(&|e| e.reason = String::new())), "reason");
        assert_eq!(field(event(&|e| e.reason = "a\nb".into())), "reason");
        assert_eq!(field(event(&|e| e.reason = "r".repeat(129))), "reason");
        assert_eq!(field(event(&|e| e.message = "m".repeat(1025))), "message");
        let many = pb::EventReport {
            events: vec![pb::EdgeEvent::default(); MAX_EVENTS_PER_REPORT + 1],
        };
        assert_eq!(
            field(Message::try_from(pb::Envelope {
                body: Some(Body::Events(many))
            })),
            "events"
        );
    }

    #[test]
    fn tokens_need_minor_1() {
        assert!(PROTOCOL_VERSION.has_tokens());
        assert!(!ProtocolVersion { major: 1, minor: 0 }.has_tokens());
        assert!(!ProtocolVersion { major: 2, minor: 1 }.has_tokens());
    }
}
