//! Raw tunnel clients for tests that speak the protocol themselves (hostile or broken peers):
//! a QUIC connection with a node's identity, and how the cloud closed it.

use std::path::Path;
use std::time::Duration;

use edgecore::{dial, identity, tls};
use quinn::{Connection, ConnectionError};

use crate::Cloud;

/// Connects to `cloud` with the node identity in `dir` (mutual TLS), panicking on failure.
pub async fn connect_as(dir: &Path, cloud: &Cloud) -> Connection {
    let identity = identity::load(dir).expect("identity");
    connect_with(&identity, cloud).await.expect("connect")
}

/// Connects to `cloud` with `identity`; the dial error is the caller's to judge.
pub async fn connect_with(
    identity: &identity::Identity,
    cloud: &Cloud,
) -> Result<Connection, dial::DialError> {
    let addr = dial::resolve(&cloud.address()).await?;
    let endpoint = dial::client_endpoint(addr)?;
    let config = tls::node_config(identity).expect("tls config");
    dial::connect(
        &endpoint,
        config,
        &cloud.address(),
        addr,
        Duration::from_secs(5),
    )
    .await
}

/// Waits for the cloud to close the connection and returns its application close code.
pub async fn closed_by_cloud(connection: &Connection) -> u32 {
    match tokio::time::timeout(Duration::from_secs(5), connection.closed()).await {
        Ok(ConnectionError::ApplicationClosed(close)) => close.error_code.into_inner() as u32,
        Ok(other) => panic!("closed, but not by the application: {other}"),
        Err(_) => panic!("the cloud did not close the connection within 5 s"),
    }
}

/// A node's session spoken by the test itself: `Hello` with an empty inventory, then every
/// upsert and delete acknowledged as it arrives and the upserts kept, as a gateway that holds
/// whatever it is sent.
pub struct Session {
    writer: proto::FrameWriter<quinn::SendStream>,
    reader: proto::FrameReader<quinn::RecvStream>,
    _connection: Connection,
    /// Upserts received, oldest first: kind, name, uid.
    pub received: Vec<(String, String, String)>,
    /// How long [`Session::wait_for`] waits.
    pub patience: Duration,
}

impl Session {
    /// Connects with the node identity in `dir` and waits for the cloud's `HelloAck`.
    pub async fn open(dir: &Path, cloud: &Cloud, patience: Duration) -> Session {
        let connection = connect_as(dir, cloud).await;
        let (send, recv) = connection.open_bi().await.expect("stream");
        let mut session = Session {
            writer: proto::FrameWriter::new(send, proto::DEFAULT_MAX_FRAME_SIZE),
            reader: proto::FrameReader::new(recv, proto::DEFAULT_MAX_FRAME_SIZE),
            _connection: connection,
            received: Vec::new(),
            patience,
        };
        session
            .send(proto::Message::Hello(proto::Hello {
                version: proto::PROTOCOL_VERSION,
                node_info: proto::NodeInfo::default(),
                inventory: Vec::new(),
                cloud_state_id: String::new(),
            }))
            .await;
        session
            .wait_for("HelloAck", |m| matches!(m, proto::Message::HelloAck(_)))
            .await;
        session
    }

    pub async fn send(&mut self, message: proto::Message) {
        self.writer.send(message).await.expect("send");
    }

    /// Reads (acknowledging upserts and deletes) until `want` matches a message; panics after
    /// [`Session::patience`] naming `what`.
    pub async fn wait_for(
        &mut self,
        what: &str,
        want: impl Fn(&proto::Message) -> bool,
    ) -> proto::Message {
        let deadline = tokio::time::Instant::now() + self.patience;
        loop {
            let next = tokio::time::timeout_at(deadline, self.reader.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no {what} within {:?}; received {:?}",
                        self.patience, self.received
                    )
                })
                .expect("read")
                .unwrap_or_else(|| panic!("the cloud closed the stream waiting for {what}"));
            let seq = match &next {
                proto::Message::Upsert(u) => {
                    let o = &u.object;
                    self.received
                        .push((o.kind.clone(), o.name.clone(), o.uid.clone()));
                    Some(u.seq)
                }
                proto::Message::Delete(d) => Some(d.seq),
                _ => None,
            };
            if let Some(seq) = seq {
                self.send(proto::Message::Ack { seqs: vec![seq] }).await;
            }
            if want(&next) {
                return next;
            }
        }
    }
}
