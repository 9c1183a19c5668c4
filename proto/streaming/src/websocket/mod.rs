//! The server role over WebSocket: remotecommand (`v5.channel.k8s.io` down to
//! `channel.k8s.io`, binary and base64) and port-forward (`v4.channel.k8s.io` channels, and
//! SPDY/3.1 tunneled in binary messages, `SPDY/3.1+portforward.k8s.io`), as kube-apiserver and
//! the kubelet serve them ([docs/streams.md](../../../../docs/streams.md), section WebSocket).
//!
//! Each entry point checks the RFC 6455 upgrade request and negotiates the subprotocol from
//! the client's list before anything is sent, so a request it cannot serve gets a plain
//! [`Rejection`]; otherwise it answers `101 Switching Protocols` and spawns the session on the
//! connection hyper hands over after that response.

mod channel;
mod portforward;
mod remotecommand;
mod tunnel;

use bytes::Bytes;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::{BoxRead, BoxWrite, Dial, RcOptions, Rejection};
use channel::Encoding;

pub use tunnel::WebSocketBytes;

/// Largest message (and frame) accepted from a client. A bigger one closes the connection
/// with status 1009 and a reason naming the size; nothing of it is buffered past the limit.
pub const MAX_MESSAGE_SIZE: usize = 1 << 20;

/// How long a session waits for the client's half of the closing handshake, and for the
/// tunnel's writer to finish, once it has decided to end.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// A remotecommand subprotocol: how channel bytes are carried and what its version adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RcProtocol {
    encoding: Encoding,
    /// 1 to 5; v4 sends the exit as a JSON `Status`, v5 adds the close signal (channel 255).
    version: u8,
}

impl RcProtocol {
    fn json_status(self) -> bool {
        self.version >= 4
    }

    fn close_signal(self) -> bool {
        self.version >= 5
    }
}

/// The remotecommand subprotocols, by name. A client that offers none speaks
/// `channel.k8s.io`, as the kubelet assumes.
const RC_PROTOCOLS: &[(&str, RcProtocol)] = &[
    ("v5.channel.k8s.io", rc(Encoding::Binary, 5)),
    ("v4.channel.k8s.io", rc(Encoding::Binary, 4)),
    ("v4.base64.channel.k8s.io", rc(Encoding::Base64, 4)),
    ("v3.channel.k8s.io", rc(Encoding::Binary, 3)),
    ("v2.channel.k8s.io", rc(Encoding::Binary, 2)),
    ("channel.k8s.io", rc(Encoding::Binary, 1)),
    ("base64.channel.k8s.io", rc(Encoding::Base64, 1)),
];
const RC_UNOFFERED: RcProtocol = rc(Encoding::Binary, 1);

const fn rc(encoding: Encoding, version: u8) -> RcProtocol {
    RcProtocol { encoding, version }
}

/// A port-forward subprotocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PfProtocol {
    /// SPDY/3.1 frames inside binary messages (kubectl 1.31+, `PortForwardWebsockets`).
    SpdyTunnel,
    /// The kubelet's channels: per port a data channel 2*i and an error channel 2*i+1.
    Channels(Encoding),
}

const PF_PROTOCOLS: &[(&str, PfProtocol)] = &[
    ("SPDY/3.1+portforward.k8s.io", PfProtocol::SpdyTunnel),
    ("v4.channel.k8s.io", PfProtocol::Channels(Encoding::Binary)),
    (
        "v4.base64.channel.k8s.io",
        PfProtocol::Channels(Encoding::Base64),
    ),
];
const PF_UNOFFERED: PfProtocol = PfProtocol::Channels(Encoding::Binary);

/// See [`crate::remotecommand`].
pub fn remotecommand<B>(
    request: &mut http::Request<B>,
    options: RcOptions,
    tunnel: (BoxWrite, BoxRead),
) -> Result<http::Response<Bytes>, Rejection> {
    if !(options.stdin || options.stdout || options.stderr) {
        return Err(bad_request(
            "you must specify at least 1 of stdin, stdout, stderr",
        ));
    }
    let accepted = accept(request, RC_PROTOCOLS, RC_UNOFFERED)?;
    let protocol = accepted.protocol;
    tracing::debug!(
        protocol = accepted.name,
        ?options,
        "websocket remotecommand"
    );
    tokio::spawn(async move {
        if let Some(ws) = upgraded(accepted.upgrade).await {
            remotecommand::serve(ws, protocol, options, tunnel).await;
        }
    });
    Ok(accepted.response)
}

/// See [`crate::portforward`].
pub fn portforward<B>(
    request: &mut http::Request<B>,
    ports: Vec<u16>,
    dial: Dial,
) -> Result<http::Response<Bytes>, Rejection> {
    let accepted = accept(request, PF_PROTOCOLS, PF_UNOFFERED)?;
    tracing::debug!(protocol = accepted.name, ?ports, "websocket portforward");
    match accepted.protocol {
        PfProtocol::SpdyTunnel => {
            tokio::spawn(async move {
                if let Some(ws) = upgraded(accepted.upgrade).await {
                    crate::spdy::server::serve_portforward(WebSocketBytes::new(ws), dial).await;
                }
            });
        }
        PfProtocol::Channels(encoding) => {
            if ports.is_empty() {
                return Err(bad_request("query parameter \"ports\" is required"));
            }
            if ports.len() > encoding.max_ports() {
                return Err(bad_request(&format!(
                    "{} ports asked for; this protocol carries at most {}",
                    ports.len(),
                    encoding.max_ports()
                )));
            }
            if let Some(zero) = ports.iter().find(|p| **p == 0) {
                return Err(bad_request(&format!("port {zero} must be > 0")));
            }
            tokio::spawn(async move {
                if let Some(ws) = upgraded(accepted.upgrade).await {
                    portforward::serve(ws, encoding, ports, dial).await;
                }
            });
        }
    }
    Ok(accepted.response)
}

/// An upgrade request that passed the checks: the protocol chosen and the `101` to send.
struct Accepted<P> {
    protocol: P,
    /// The subprotocol's name, empty when the client offered none.
    name: &'static str,
    response: http::Response<Bytes>,
    upgrade: OnUpgrade,
}

/// Checks an RFC 6455 opening handshake and picks the first subprotocol of the client's list
/// that `supported` names (`unoffered` when the client lists none).
fn accept<B, P: Copy>(
    request: &mut http::Request<B>,
    supported: &[(&'static str, P)],
    unoffered: P,
) -> Result<Accepted<P>, Rejection> {
    use http::header;

    if request.method() != http::Method::GET {
        return Err(Rejection {
            code: 405,
            message: format!(
                "a websocket upgrade is a GET request, not {}",
                request.method()
            ),
        });
    }
    let headers = request.headers();
    if !has_token(headers, header::CONNECTION, "upgrade") {
        return Err(bad_request(
            "a websocket upgrade needs the header \"Connection: Upgrade\"",
        ));
    }
    if !has_token(headers, header::UPGRADE, "websocket") {
        return Err(bad_request(
            "a websocket upgrade needs the header \"Upgrade: websocket\"",
        ));
    }
    match headers.get(header::SEC_WEBSOCKET_VERSION) {
        Some(v) if v.as_bytes() == b"13" => {}
        Some(v) => {
            return Err(bad_request(&format!(
                "Sec-WebSocket-Version {:?} is not supported: only 13 is",
                String::from_utf8_lossy(v.as_bytes())
            )));
        }
        None => return Err(bad_request("the header Sec-WebSocket-Version is missing")),
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| bad_request("the header Sec-WebSocket-Key is missing"))?;
    if !valid_key(key.as_bytes()) {
        return Err(bad_request(
            "Sec-WebSocket-Key is not the base64 of 16 bytes",
        ));
    }
    let offered = offered_protocols(headers);
    let (name, protocol) = if offered.is_empty() {
        ("", unoffered)
    } else {
        offered
            .iter()
            .find_map(|o| supported.iter().find(|(name, _)| name == o).copied())
            .ok_or_else(|| {
                let names: Vec<&str> = supported.iter().map(|(name, _)| *name).collect();
                bad_request(&format!(
                    "none of the requested subprotocols ({}) is supported; supported: {}",
                    offered.join(", "),
                    names.join(", ")
                ))
            })?
    };
    if request.extensions().get::<OnUpgrade>().is_none() {
        return Err(bad_request(
            "this connection cannot be upgraded: a websocket needs HTTP/1.1",
        ));
    }
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut response = http::Response::builder()
        .status(http::StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept);
    if !name.is_empty() {
        response = response.header(header::SEC_WEBSOCKET_PROTOCOL, name);
    }
    let response = response.body(Bytes::new()).map_err(|e| Rejection {
        code: 500,
        message: format!("building the 101 response: {e}"),
    })?;
    Ok(Accepted {
        protocol,
        name,
        response,
        upgrade: hyper::upgrade::on(request),
    })
}

/// Whether a comma-separated header (any of its lines) holds `token`, case-insensitively.
fn has_token(headers: &http::HeaderMap, name: http::header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The client's subprotocols in its order of preference.
fn offered_protocols(headers: &http::HeaderMap) -> Vec<String> {
    headers
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(String::from)
        .collect()
}

fn valid_key(key: &[u8]) -> bool {
    use base64::Engine as _;
    matches!(
        base64::engine::general_purpose::STANDARD.decode(key),
        Ok(raw) if raw.len() == 16
    )
}

fn bad_request(message: &str) -> Rejection {
    Rejection {
        code: 400,
        message: message.into(),
    }
}

/// The WebSocket on the connection hyper hands over after the `101`, or `None` (logged) when
/// the client went away before.
async fn upgraded(
    upgrade: OnUpgrade,
) -> Option<WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>> {
    match upgrade.await {
        Ok(io) => Some(server_socket(TokioIo::new(io)).await),
        Err(error) => {
            tracing::debug!(%error, "websocket upgrade did not complete");
            None
        }
    }
}

/// The server side of a WebSocket on an upgraded connection, with the message limit.
async fn server_socket<S>(io: S) -> WebSocketStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_SIZE))
        .max_frame_size(Some(MAX_MESSAGE_SIZE));
    WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade_request(protocols: &[&str]) -> http::Request<()> {
        let mut b = http::Request::get("/exec")
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
        for p in protocols {
            b = b.header("sec-websocket-protocol", *p);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn the_clients_first_supported_protocol_wins() {
        // Without hyper's upgrade handle the request gets as far as negotiation, then 400.
        let names = |req: &mut http::Request<()>| {
            accept(req, RC_PROTOCOLS, RC_UNOFFERED)
                .err()
                .map(|r| r.message)
                .unwrap_or_default()
        };
        let mut req = upgrade_request(&["bogus, v4.base64.channel.k8s.io", "v5.channel.k8s.io"]);
        assert!(names(&mut req).contains("HTTP/1.1"), "{}", names(&mut req));
        let offered = offered_protocols(req.headers());
        assert_eq!(
            offered,
            ["bogus", "v4.base64.channel.k8s.io", "v5.channel.k8s.io"]
        );
        let mut req = upgrade_request(&["v9.channel.k8s.io"]);
        let message = names(&mut req);
        assert!(message.contains("v9.channel.k8s.io"), "{message}");
        assert!(
            message.contains("supported: v5.channel.k8s.io"),
            "{message}"
        );
    }

    #[test]
    fn malformed_handshakes_are_refused_naming_the_header() {
        type Spoil = fn(&mut http::Request<()>);
        let cases: [(&str, Spoil); 5] = [
            ("Sec-WebSocket-Key", |r| {
                r.headers_mut().remove("sec-websocket-key");
            }),
            ("Sec-WebSocket-Key", |r| {
                r.headers_mut()
                    .insert("sec-websocket-key", "c2hvcnQ=".parse().unwrap());
            }),
            ("Sec-WebSocket-Version", |r| {
                r.headers_mut()
                    .insert("sec-websocket-version", "8".parse().unwrap());
            }),
            ("Connection: Upgrade", |r| {
                r.headers_mut()
                    .insert("connection", "keep-alive".parse().unwrap());
            }),
            ("GET", |r| *r.method_mut() = http::Method::POST),
        ];
        for (needle, spoil) in cases {
            let mut req = upgrade_request(&["v5.channel.k8s.io"]);
            spoil(&mut req);
            let rejection = accept(&mut req, RC_PROTOCOLS, RC_UNOFFERED)
                .err()
                .expect("refused");
            assert!(
                rejection.message.contains(needle),
                "{needle}: {rejection:?}"
            );
            assert!(rejection.code == 400 || rejection.code == 405);
        }
    }

    #[test]
    fn protocol_versions_gate_the_status_format_and_close_signal() {
        let find = |n: &str| RC_PROTOCOLS.iter().find(|(name, _)| *name == n).unwrap().1;
        assert!(find("v5.channel.k8s.io").close_signal());
        assert!(!find("v4.channel.k8s.io").close_signal());
        assert!(find("v4.base64.channel.k8s.io").json_status());
        assert!(!find("v3.channel.k8s.io").json_status());
        assert!(!RC_UNOFFERED.json_status());
    }
}
