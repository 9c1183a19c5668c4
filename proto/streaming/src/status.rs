//! What both transports send on a remote command's error channel and read from its resize
//! channel, as kubelet's remotecommand protocol defines them.

use proto::stream::ExitStatus;

/// The v4+ error channel's body for how a command ended: a `Status` of `Success`, or of
/// `Failure` with reason `NonZeroExitCode` and the code in a cause of reason `ExitCode` (what
/// kubectl turns into its own exit code); a failure without an exit code is a plain
/// `Failure` with the message.
pub fn exit_status_json(status: &ExitStatus) -> Vec<u8> {
    let value = match status.code {
        Some(0) => serde_json::json!({"metadata": {}, "status": "Success"}),
        Some(code) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("command terminated with non-zero exit code: {code}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        None => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": status.message,
            "reason": "InternalError",
        }),
    };
    value.to_string().into_bytes()
}

/// The error channel's body before v4 (`channel.k8s.io` to `v3`): the message only, nothing
/// for success.
pub fn exit_status_text(status: &ExitStatus) -> Vec<u8> {
    match status.code {
        Some(0) => Vec::new(),
        Some(code) => format!("command terminated with non-zero exit code: {code}").into_bytes(),
        None => status.message.clone().into_bytes(),
    }
}

/// A resize message (`{"Width":80,"Height":24}`), or `None` for anything else.
pub fn parse_resize(body: &[u8]) -> Option<(u16, u16)> {
    #[derive(serde::Deserialize)]
    struct Size {
        #[serde(rename = "Width")]
        width: u16,
        #[serde(rename = "Height")]
        height: u16,
    }
    serde_json::from_slice::<Size>(body)
        .ok()
        .map(|s| (s.width, s.height))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_zero_exit_carries_the_code_as_kubectl_reads_it() {
        let body = exit_status_json(&ExitStatus {
            code: Some(3),
            message: String::new(),
        });
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["reason"], "NonZeroExitCode");
        assert_eq!(v["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(v["details"]["causes"][0]["message"], "3");
        let ok: serde_json::Value = serde_json::from_slice(&exit_status_json(&ExitStatus {
            code: Some(0),
            message: String::new(),
        }))
        .unwrap();
        assert_eq!(ok["status"], "Success");
    }

    #[test]
    fn resize_is_parsed_and_garbage_is_not() {
        assert_eq!(
            parse_resize(br#"{"Width":120,"Height":40}"#),
            Some((120, 40))
        );
        assert_eq!(parse_resize(b"{}"), None);
        assert_eq!(parse_resize(b"\xff"), None);
    }
}
