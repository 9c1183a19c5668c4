//! `kubectl logs` on a stream: a container's log from the files the runtime writes under
//! `DIR/pods/<uid>/logs/<container>/<attempt>.log` (CRI format: `<RFC3339Nano> <stdout|stderr>
//! <F|P> <message>`, partial `P` parts joined to the next `F`), with every `PodLogOptions`
//! option handled as the kubelet does.
//!
//! Memory stays flat whatever the reader does: one chunk of the file is read, turned into
//! output and written with `write_all` before the next is read, so a stalled reader stalls the
//! file reading (QUIC's flow control is the backpressure). `follow` polls at end of file (no
//! inotify) and moves on to the next instance's file when the container restarts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::stream::{LogsRequest, Refusal, RefusalCode};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// How often a followed log is looked at again at end of file.
pub const FOLLOW_POLL: Duration = Duration::from_millis(150);
/// Bytes read from a log file at once; at most this much output (plus timestamps) is held.
const CHUNK: usize = 32 * 1024;
/// Longest incomplete line kept while waiting for its end (the runtime splits lines at 16 KiB,
/// so only a damaged file gets here); beyond it the bytes are handled as a line.
const MAX_PENDING_LINE: usize = 1024 * 1024;

/// The options of a logs request, checked and resolved against the clock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// Only messages at or after this time.
    pub since: Option<OffsetDateTime>,
    /// Prefix each message with its timestamp (RFC 3339, 9 fractional digits) and a space.
    pub timestamps: bool,
    /// Only the last N messages of the file.
    pub tail: Option<u64>,
    /// Stop after this many bytes of output.
    pub limit: Option<u64>,
}

impl Options {
    /// The options of `request` at `now`; a bad value is named in the error (kube-apiserver
    /// refuses the same values with 400).
    pub fn from_request(request: &LogsRequest, now: OffsetDateTime) -> Result<Options, String> {
        if request.limit_bytes == Some(0) {
            return Err("limitBytes must be greater than zero".into());
        }
        if request.since_seconds == Some(0) {
            return Err("sinceSeconds must be greater than zero".into());
        }
        let mut since = request.since_seconds.map(|s| {
            now - time::Duration::seconds(i64::try_from(s).unwrap_or(i64::MAX / 1_000_000_000))
        });
        if let Some(text) = &request.since_time {
            let at = OffsetDateTime::parse(text, &Rfc3339)
                .map_err(|e| format!("sinceTime {text:?} is not an RFC 3339 time: {e}"))?;
            // The later of the two wins, as in the kubelet.
            if since.is_none_or(|s| at > s) {
                since = Some(at);
            }
        }
        Ok(Options {
            since,
            timestamps: request.timestamps,
            tail: request.tail_lines,
            limit: request.limit_bytes,
        })
    }
}

/// The log files of one container, oldest instance first.
fn instances(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            if path.extension()? != "log" {
                return None;
            }
            let attempt: u64 = path.file_stem()?.to_str()?.parse().ok()?;
            Some((attempt, path))
        })
        .collect();
    found.sort();
    found
}

/// One line of a CRI log file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Line<'a> {
    time: OffsetDateTime,
    partial: bool,
    message: &'a [u8],
}

fn parse_line(line: &[u8]) -> Option<Line<'_>> {
    let mut parts = line.splitn(4, |b| *b == b' ');
    let time = std::str::from_utf8(parts.next()?).ok()?;
    let time = OffsetDateTime::parse(time, &Rfc3339).ok()?;
    let _stream = parts.next()?;
    let partial = match parts.next()? {
        b"P" => true,
        b"F" => false,
        _ => return None,
    };
    Some(Line {
        time,
        partial,
        message: parts.next().unwrap_or_default(),
    })
}

/// The kubelet's output timestamp: RFC 3339 in UTC with nine fractional digits.
fn format_time(time: OffsetDateTime) -> String {
    let t = time.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond()
    )
}

/// Turns CRI log lines into what kubectl shows, one line at a time, with no buffering of its
/// own: a message's parts are written as they come, its timestamp before the first.
#[derive(Debug)]
struct Render {
    options: Options,
    /// Messages still to skip for `tail`.
    skip: u64,
    /// Inside a message whose parts so far were `P`: whether it is shown.
    open: Option<bool>,
    written: u64,
}

impl Render {
    fn new(options: Options, skip: u64) -> Self {
        Render {
            options,
            skip,
            open: None,
            written: 0,
        }
    }

    /// Another file starts (the container restarted): no message continues into it, and
    /// `tail` applied to the first file only.
    fn next_file(&mut self) {
        self.open = None;
        self.skip = 0;
    }

    fn limit_reached(&self) -> bool {
        self.options.limit.is_some_and(|l| self.written >= l)
    }

    /// Appends the output of one file line to `out`; returns false once the byte limit is
    /// reached (nothing more may be written).
    fn line(&mut self, raw: &[u8], out: &mut Vec<u8>) -> bool {
        let Some(line) = parse_line(raw) else {
            return !self.limit_reached();
        };
        let start = out.len();
        let shown = match self.open {
            Some(shown) => shown,
            None => {
                let shown =
                    self.skip == 0 && self.options.since.is_none_or(|since| line.time >= since);
                if shown && self.options.timestamps {
                    out.extend_from_slice(format_time(line.time).as_bytes());
                    out.push(b' ');
                }
                shown
            }
        };
        if shown {
            out.extend_from_slice(line.message);
            if !line.partial {
                out.push(b'\n');
            }
        }
        if line.partial {
            self.open = Some(shown);
        } else {
            self.open = None;
            self.skip = self.skip.saturating_sub(1);
        }
        if let Some(limit) = self.options.limit {
            let room = limit.saturating_sub(self.written) as usize;
            if out.len() - start > room {
                out.truncate(start + room);
            }
        }
        self.written += (out.len() - start) as u64;
        !self.limit_reached()
    }
}

/// Complete messages (ending with an `F` line) in the file, for `tail`.
async fn count_messages(path: &Path) -> std::io::Result<u64> {
    let mut file = tokio::fs::File::open(path).await?;
    let mut buf = vec![0u8; CHUNK];
    let mut pending: Vec<u8> = Vec::new();
    let mut count = 0;
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok(count);
        }
        pending.extend_from_slice(&buf[..n]);
        let mut start = 0;
        while let Some(i) = pending[start..].iter().position(|b| *b == b'\n') {
            if parse_line(&pending[start..start + i]).is_some_and(|l| !l.partial) {
                count += 1;
            }
            start += i + 1;
        }
        pending.drain(..start);
        if pending.len() > MAX_PENDING_LINE {
            pending.clear();
        }
    }
}

/// Which instance's log to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instance {
    /// The newest one (running, or the last that ran).
    Current,
    /// The one before it (`--previous`).
    Previous,
}

/// Follow the log as it grows (and into later instances' files), or stop at its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    Yes,
    No,
}

/// The file to read, or the refusal when there is none.
pub fn pick(
    dir: &Path,
    instance: Instance,
    pod: &str,
    container: &str,
) -> Result<(u64, PathBuf), Refusal> {
    let mut found = instances(dir);
    let picked = match instance {
        Instance::Current => found.pop(),
        Instance::Previous => {
            found.pop();
            found.pop()
        }
    };
    picked.ok_or_else(|| match instance {
        Instance::Current => Refusal {
            code: RefusalCode::ContainerNotFound,
            message: format!(
                "container \"{container}\" in pod \"{pod}\" is waiting to start: no log yet"
            ),
        },
        Instance::Previous => Refusal {
            code: RefusalCode::ContainerNotFound,
            message: format!(
                "previous terminated container \"{container}\" in pod \"{pod}\" not found"
            ),
        },
    })
}

/// Writes the log of `container` from file `start` (an `<attempt>.log` in `dir`) to `out` as
/// `options` say, until its end or, with [`Follow::Yes`], until `stop` is cancelled, the byte
/// limit is reached or `out` fails.
pub async fn write_log<W: AsyncWrite + Unpin>(
    dir: &Path,
    start: (u64, PathBuf),
    options: Options,
    follow: Follow,
    out: &mut W,
    stop: &CancellationToken,
) -> std::io::Result<()> {
    let (mut attempt, path) = start;
    let skip = match options.tail {
        Some(tail) => count_messages(&path).await?.saturating_sub(tail),
        None => 0,
    };
    let mut render = Render::new(options, skip);
    let mut file = tokio::fs::File::open(&path).await?;
    let mut buf = vec![0u8; CHUNK];
    let mut pending: Vec<u8> = Vec::new();
    let mut output: Vec<u8> = Vec::with_capacity(CHUNK);
    loop {
        let n = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            n = file.read(&mut buf) => n?,
        };
        if n > 0 {
            pending.extend_from_slice(&buf[..n]);
            let mut more = true;
            let mut start = 0;
            while let Some(i) = pending[start..].iter().position(|b| *b == b'\n') {
                more = render.line(&pending[start..start + i], &mut output);
                start += i + 1;
                if !more {
                    break;
                }
            }
            pending.drain(..start);
            if pending.len() > MAX_PENDING_LINE {
                more = render.line(&std::mem::take(&mut pending), &mut output);
            }
            if !output.is_empty() {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    written = out.write_all(&output) => written?,
                }
                output.clear();
            }
            if !more {
                return Ok(());
            }
            continue;
        }
        if follow == Follow::No {
            return Ok(());
        }
        // At the end of this file: a newer instance's file means the container restarted; what
        // this one held was read to its end above.
        if let Some((next, path)) = instances(dir).into_iter().find(|(a, _)| *a > attempt) {
            attempt = next;
            file = tokio::fs::File::open(&path).await?;
            pending.clear();
            render.next_file();
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(FOLLOW_POLL) => {}
        }
    }
}

/// Serves a logs stream for container `container` of the pod `uid` (already checked to be this
/// node's): answers the request on `send` (`Accepted`, or why not), then writes the log.
pub async fn serve<W: AsyncWrite + Unpin>(
    data_dir: &Path,
    uid: &str,
    container: &str,
    request: &LogsRequest,
    send: &mut W,
    stop: &CancellationToken,
) -> std::io::Result<()> {
    let pod = format!("{}/{}", request.pod.namespace, request.pod.name);
    let dir = crate::pods::spec::pod_paths(data_dir, uid)
        .log_dir
        .join(container);
    let options = match Options::from_request(request, OffsetDateTime::now_utc()) {
        Ok(options) => options,
        Err(message) => {
            return super::refuse(send, RefusalCode::BadRequest, message).await;
        }
    };
    let (instance, follow) = match (request.previous, request.follow) {
        // The previous instance has exited: there is nothing to follow.
        (true, _) => (Instance::Previous, Follow::No),
        (false, true) => (Instance::Current, Follow::Yes),
        (false, false) => (Instance::Current, Follow::No),
    };
    let start = match pick(&dir, instance, &pod, container) {
        Ok(start) => start,
        Err(refusal) => return super::refuse(send, refusal.code, refusal.message).await,
    };
    proto::stream::write_header(send, &proto::stream::StreamReply::Accepted)
        .await
        .map_err(std::io::Error::other)?;
    write_log(&dir, start, options, follow, send, stop).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: &str = "2026-11-24T05:31:04.8Z";

    fn at(text: &str) -> OffsetDateTime {
        OffsetDateTime::parse(text, &Rfc3339).expect("time")
    }

    fn write(dir: &Path, attempt: u64, text: &str) -> PathBuf {
        std::fs::create_dir_all(dir).expect("dir");
        let path = dir.join(format!("{attempt}.log"));
        std::fs::write(&path, text).expect("write");
        path
    }

    fn append(path: &Path, text: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .expect("open");
        f.write_all(text.as_bytes()).expect("append");
    }

    /// A log of five lines a second apart, the fourth split into two partial parts.
    const LOG: &str = "\
2026-11-24T05:31:01.000000001Z stdout F one
2026-11-24T05:31:02Z stderr F two
2026-11-24T05:31:03.5Z stdout F three
2026-11-24T05:31:04.8Z stdout P fo
2026-11-24T05:31:04.9Z stdout F ur
2026-11-24T05:31:05Z stdout F five
";

    async fn read(options: Options) -> String {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = write(tmp.path(), 0, LOG);
        let mut out = Vec::new();
        write_log(
            tmp.path(),
            (0, path),
            options,
            Follow::No,
            &mut out,
            &CancellationToken::new(),
        )
        .await
        .expect("read");
        String::from_utf8(out).expect("utf-8")
    }

    #[tokio::test]
    async fn partial_lines_are_joined_and_every_stream_is_shown() {
        assert_eq!(
            read(Options::default()).await,
            "one\ntwo\nthree\nfour\nfive\n"
        );
    }

    #[tokio::test]
    async fn timestamps_prefix_each_message_with_nine_digits() {
        let options = Options {
            timestamps: true,
            ..Default::default()
        };
        assert_eq!(
            read(options).await,
            "2026-11-24T05:31:01.000000001Z one\n\
             2026-11-24T05:31:02.000000000Z two\n\
             2026-11-24T05:31:03.500000000Z three\n\
             2026-11-24T05:31:04.800000000Z four\n\
             2026-11-24T05:31:05.000000000Z five\n"
        );
    }

    #[tokio::test]
    async fn tail_counts_whole_messages() {
        for (tail, expected) in [
            (0, ""),
            (2, "four\nfive\n"),
            (3, "three\nfour\nfive\n"),
            (9, "one\ntwo\nthree\nfour\nfive\n"),
        ] {
            let options = Options {
                tail: Some(tail),
                ..Default::default()
            };
            assert_eq!(read(options).await, expected, "tail {tail}");
        }
    }

    #[tokio::test]
    async fn since_keeps_messages_at_or_after_it_by_their_first_part() {
        let options = Options {
            since: Some(at("2026-11-24T05:31:03.5Z")),
            ..Default::default()
        };
        assert_eq!(read(options).await, "three\nfour\nfive\n");
        let options = Options {
            since: Some(at("2026-11-24T05:31:04.85Z")),
            ..Default::default()
        };
        // "four" started before: its second part is not shown on its own.
        assert_eq!(read(options).await, "five\n");
    }

    #[tokio::test]
    async fn limit_bytes_cuts_the_output_exactly() {
        let options = Options {
            limit: Some(10),
            ..Default::default()
        };
        assert_eq!(read(options).await, "one\ntwo\nth");
        let options = Options {
            limit: Some(4),
            tail: Some(1),
            timestamps: true,
            ..Default::default()
        };
        assert_eq!(read(options).await, "2026");
    }

    #[test]
    fn options_resolve_since_and_refuse_bad_values() {
        let now = at("2026-11-24T06:00:00Z");
        let request = |f: fn(&mut LogsRequest)| {
            let mut r = LogsRequest::default();
            f(&mut r);
            Options::from_request(&r, now)
        };
        assert_eq!(
            request(|r| r.since_seconds = Some(60)).expect("ok").since,
            Some(at("2026-11-24T05:59:00Z"))
        );
        // The later of sinceSeconds and sinceTime wins.
        let both = request(|r| {
            r.since_seconds = Some(60);
            r.since_time = Some("2026-11-24T05:59:30Z".into());
        });
        assert_eq!(both.expect("ok").since, Some(at("2026-11-24T05:59:30Z")));
        let both = request(|r| {
            r.since_seconds = Some(10);
            r.since_time = Some("2026-11-24T05:59:30Z".into());
        });
        assert_eq!(both.expect("ok").since, Some(at("2026-11-24T05:59:50Z")));
        let err = request(|r| r.since_time = Some("yesterday".into())).unwrap_err();
        assert!(err.contains("sinceTime \"yesterday\""), "{err}");
        let err = request(|r| r.limit_bytes = Some(0)).unwrap_err();
        assert!(err.contains("limitBytes"), "{err}");
        let err = request(|r| r.since_seconds = Some(0)).unwrap_err();
        assert!(err.contains("sinceSeconds"), "{err}");
    }

    #[test]
    fn previous_is_the_instance_before_the_newest() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let err = pick(tmp.path(), Instance::Current, "default/p", "c").unwrap_err();
        assert_eq!(err.code, RefusalCode::ContainerNotFound);
        write(tmp.path(), 3, "");
        let err = pick(tmp.path(), Instance::Previous, "default/p", "c").unwrap_err();
        assert_eq!(
            err.message,
            "previous terminated container \"c\" in pod \"default/p\" not found"
        );
        write(tmp.path(), 4, "");
        // 10 sorts after 4 as a number, not as text.
        write(tmp.path(), 10, "");
        assert_eq!(
            pick(tmp.path(), Instance::Current, "p", "c")
                .expect("current")
                .0,
            10
        );
        assert_eq!(
            pick(tmp.path(), Instance::Previous, "p", "c")
                .expect("previous")
                .0,
            4
        );
    }

    /// Reads from `reader` into `got` until it ends with `wanted`, for 5 s at most.
    async fn read_until(reader: &mut tokio::io::DuplexStream, got: &mut Vec<u8>, wanted: &str) {
        let read = async {
            while !String::from_utf8_lossy(got).ends_with(wanted) {
                let mut buf = [0u8; 256];
                let n = reader.read(&mut buf).await.expect("read");
                assert!(n > 0, "the log ended early");
                got.extend_from_slice(&buf[..n]);
            }
        };
        if tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .is_err()
        {
            panic!("no {wanted:?} in {:?}", String::from_utf8_lossy(got));
        }
    }

    #[tokio::test]
    async fn follow_goes_on_into_the_next_instance_after_a_restart() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let first = write(&dir, 0, &format!("{T0} stdout F a\n"));
        let stop = CancellationToken::new();
        let (mut reader, mut writer) = tokio::io::duplex(64 * 1024);
        let task = {
            let (dir, stop) = (dir.clone(), stop.clone());
            tokio::spawn(async move {
                write_log(
                    &dir,
                    (0, first.clone()),
                    Options::default(),
                    Follow::Yes,
                    &mut writer,
                    &stop,
                )
                .await
            })
        };
        let mut got = Vec::new();
        read_until(&mut reader, &mut got, "a\n").await;
        // Appended to the running instance's file, a line in two writes.
        append(
            &dir.join("0.log"),
            &format!("{T0} stdout F b\n{T0} stdout "),
        );
        append(&dir.join("0.log"), "F c\n");
        read_until(&mut reader, &mut got, "b\nc\n").await;
        // The container restarts: its next instance writes a new file.
        write(&dir, 1, &format!("{T0} stdout F after restart\n"));
        read_until(&mut reader, &mut got, "after restart\n").await;
        append(&dir.join("1.log"), &format!("{T0} stdout F d\n"));
        read_until(&mut reader, &mut got, "d\n").await;
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops when asked")
            .expect("task")
            .expect("no error");
        assert_eq!(String::from_utf8_lossy(&got), "a\nb\nc\nafter restart\nd\n");
    }

    #[tokio::test]
    async fn a_stalled_reader_stalls_the_file_reading() {
        // 4 MiB of log behind a 64 KiB pipe nobody reads: the writer waits instead of reading
        // the file into memory; reading the pipe later gets everything in order.
        let tmp = tempfile::tempdir().expect("tempdir");
        let line = format!("{T0} stdout F {}\n", "x".repeat(1000));
        let path = write(tmp.path(), 0, &line.repeat(4096));
        let (mut reader, mut writer) = tokio::io::duplex(64 * 1024);
        let dir = tmp.path().to_path_buf();
        let task = tokio::spawn(async move {
            write_log(
                &dir,
                (0, path),
                Options::default(),
                Follow::No,
                &mut writer,
                &CancellationToken::new(),
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !task.is_finished(),
            "the writer did not wait for the reader"
        );
        let mut all = Vec::new();
        reader.read_to_end(&mut all).await.expect("read");
        task.await.expect("task").expect("no error");
        assert_eq!(all.len(), 4096 * 1001);
    }
}
