//! Puts a host address on `lo` and takes it off: one `RTM_NEWADDR` or `RTM_DELADDR` request
//! on a `NETLINK_ROUTE` socket of the calling thread's network namespace, answered by the
//! kernel's acknowledgement (rtnetlink(7)). Two requests are all the cluster DNS needs; a
//! general netlink library linked for them was a third of a megabyte of edgecore's text,
//! which is resident on the gateway (docs/benchmarks.md, "The edge build"). Against the
//! kernel, in a network namespace: `integration/tests/services_dns.rs`.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

/// `RTM_NEWADDR` and `RTM_DELADDR` (linux/rtnetlink.h).
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
/// `NLMSG_ERROR`: the kernel's answer, an acknowledgement when its error is 0.
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
/// Address attributes (linux/if_addr.h).
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
/// `AF_INET` and `AF_INET6` as `ifaddrmsg` carries them.
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// The one request in flight on a socket of our own.
const SEQUENCE: u32 = 1;
/// The kernel answers at once; this only bounds a broken kernel.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Puts `address` on `lo` as a host address (/32 or /128). Already there → an error of kind
/// [`io::ErrorKind::AlreadyExists`].
pub fn add_to_lo(address: IpAddr) -> io::Result<()> {
    let lo = lo_index()?;
    request(&address_message(
        RTM_NEWADDR,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        lo,
        address,
    ))
}

/// Takes `address` off `lo`. Not there → an error of kind
/// [`io::ErrorKind::AddrNotAvailable`].
pub fn remove_from_lo(address: IpAddr) -> io::Result<()> {
    let lo = lo_index()?;
    request(&address_message(
        RTM_DELADDR,
        NLM_F_REQUEST | NLM_F_ACK,
        lo,
        address,
    ))
}

/// `lo`'s interface index in this thread's network namespace.
fn lo_index() -> io::Result<u32> {
    let socket = rustix::net::socket_with(
        AddressFamily::INET,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    Ok(rustix::net::netdevice::name_to_index(&socket, "lo")?)
}

/// Sends one request and waits for its acknowledgement.
fn request(message: &[u8]) -> io::Result<()> {
    let socket = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::RAW,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::sockopt::set_socket_timeout(
        &socket,
        rustix::net::sockopt::Timeout::Recv,
        Some(ANSWER_TIMEOUT),
    )?;
    let kernel = SocketAddrNetlink::new(0, 0);
    rustix::net::sendto(&socket, message, SendFlags::empty(), &kernel)?;
    let mut answer = [0u8; 1024];
    loop {
        // The first count is what landed in the buffer (the second, what the datagram held).
        let (received, _) = rustix::net::recv(&socket, &mut answer[..], RecvFlags::empty())?;
        if let Some(result) = acknowledgement(&answer[..received])? {
            return result;
        }
    }
}

/// An `RTM_NEWADDR`/`RTM_DELADDR` message for `address` as a host address on interface
/// `index`: the header, an `ifaddrmsg`, and `IFA_LOCAL` and `IFA_ADDRESS` both naming it.
fn address_message(kind: u16, flags: u16, index: u32, address: IpAddr) -> Vec<u8> {
    let (family, prefix, bytes) = match address {
        IpAddr::V4(v4) => (AF_INET, 32, v4.octets().to_vec()),
        IpAddr::V6(v6) => (AF_INET6, 128, v6.octets().to_vec()),
    };
    let mut body = vec![family, prefix, 0, 0];
    body.extend_from_slice(&index.to_ne_bytes());
    for attribute in [IFA_LOCAL, IFA_ADDRESS] {
        // An attribute's length counts its 4-byte header; 4 and 16 need no padding.
        body.extend_from_slice(&(4 + bytes.len() as u16).to_ne_bytes());
        body.extend_from_slice(&attribute.to_ne_bytes());
        body.extend_from_slice(&bytes);
    }
    let mut message = Vec::with_capacity(16 + body.len());
    message.extend_from_slice(&(16 + body.len() as u32).to_ne_bytes());
    message.extend_from_slice(&kind.to_ne_bytes());
    message.extend_from_slice(&flags.to_ne_bytes());
    message.extend_from_slice(&SEQUENCE.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend(body);
    message
}

/// The outcome in a datagram from the kernel: `Some` for the acknowledgement of our request
/// (an error code of 0 is success), `None` for anything else. A datagram too short for what
/// its header says is an error.
fn acknowledgement(datagram: &[u8]) -> io::Result<Option<io::Result<()>>> {
    let mut rest = datagram;
    while rest.len() >= 16 {
        let length = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(rest[4..6].try_into().expect("2 bytes"));
        let sequence = u32::from_ne_bytes(rest[8..12].try_into().expect("4 bytes"));
        if length < 16 || length > rest.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "netlink answer with a message of {length} bytes in {} bytes",
                    rest.len()
                ),
            ));
        }
        if kind == NLMSG_ERROR && sequence == SEQUENCE {
            if length < 20 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "netlink error message without its error code",
                ));
            }
            let code = i32::from_ne_bytes(rest[16..20].try_into().expect("4 bytes"));
            return Ok(Some(match code {
                0 => Ok(()),
                negative => Err(io::Error::from_raw_os_error(-negative)),
            }));
        }
        // Messages are aligned to 4 bytes.
        let aligned = (length + 3) & !3;
        rest = &rest[aligned.min(rest.len())..];
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_is_laid_out_as_rtnetlink_says() {
        let message = address_message(
            RTM_NEWADDR,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            1,
            "169.254.20.10".parse().expect("address"),
        );
        let mut expected = Vec::new();
        expected.extend_from_slice(&40u32.to_ne_bytes());
        expected.extend_from_slice(&20u16.to_ne_bytes());
        expected.extend_from_slice(&0x605u16.to_ne_bytes());
        expected.extend_from_slice(&1u32.to_ne_bytes());
        expected.extend_from_slice(&0u32.to_ne_bytes());
        expected.extend_from_slice(&[2, 32, 0, 0]);
        expected.extend_from_slice(&1u32.to_ne_bytes());
        for attribute in [2u16, 1] {
            expected.extend_from_slice(&8u16.to_ne_bytes());
            expected.extend_from_slice(&attribute.to_ne_bytes());
            expected.extend_from_slice(&[169, 254, 20, 10]);
        }
        assert_eq!(message, expected);

        let v6 = address_message(
            RTM_DELADDR,
            NLM_F_REQUEST | NLM_F_ACK,
            7,
            "fd00::a".parse().expect("address"),
        );
        assert_eq!(v6.len(), 16 + 8 + 2 * 20);
        assert_eq!(&v6[16..20], &[10, 128, 0, 0]);
        assert_eq!(
            u16::from_ne_bytes([v6[24], v6[25]]),
            20,
            "an attribute of 16 bytes and its header"
        );
    }

    fn error_message(sequence: u32, code: i32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&sequence.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&code.to_ne_bytes());
        m.extend_from_slice(&[0; 16]);
        m
    }

    #[test]
    fn acknowledgements_and_errors_are_read_and_others_skipped() {
        assert!(matches!(
            acknowledgement(&error_message(SEQUENCE, 0)),
            Ok(Some(Ok(())))
        ));
        let exists = acknowledgement(&error_message(SEQUENCE, -17))
            .expect("well formed")
            .expect("ours")
            .expect_err("EEXIST");
        assert_eq!(exists.kind(), io::ErrorKind::AlreadyExists);
        // Another request's answer, then ours, in one datagram.
        let mut both = error_message(SEQUENCE + 1, -1);
        both.extend(error_message(SEQUENCE, -99));
        let not_available = acknowledgement(&both)
            .expect("well formed")
            .expect("ours")
            .expect_err("EADDRNOTAVAIL");
        assert_eq!(not_available.kind(), io::ErrorKind::AddrNotAvailable);
        assert!(matches!(
            acknowledgement(&error_message(SEQUENCE + 1, 0)),
            Ok(None)
        ));
        let mut truncated = error_message(SEQUENCE, 0);
        truncated.truncate(30);
        let error = acknowledgement(&truncated).expect_err("a header longer than the datagram");
        assert!(
            error.to_string().contains("36 bytes in 30 bytes"),
            "{error}"
        );
    }
}
