//! The embedded API's request decoding: the first line is the request target (path and query
//! string), the rest the body. Routing, query parameters, selectors, delete options and the body
//! through create and update preparation (`cloudcore::apiserver::fuzzing::request`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (line, body) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(target) = std::str::from_utf8(line) else {
        return;
    };
    cloudcore::apiserver::fuzzing::request(target, body);
});
