//! Fuzzes the rank-report line the front end reads over TCP: any bytes a connection sends, cut
//! into lines as the collector does (at most `MAX_LINE` bytes before the newline), each fed to
//! `cmpirun::launch::report::parse_line`. A report carrying the token or a `BadReport`, never
//! a panic; a report that is accepted survives a JSON round trip.
#![no_main]

use cmpirun::launch::report::{Report, parse_line};
use libfuzzer_sys::fuzz_target;

const TOKEN: &str = "f00dfeedf00dfeedf00dfeedf00dfeed";

fuzz_target!(|data: &[u8]| {
    for line in data.split(|&b| b == b'\n') {
        if let Ok(report) = parse_line(line, TOKEN) {
            assert_eq!(report.token, TOKEN);
            let again = serde_json::to_vec(&report).expect("a report serialises");
            let back: Report = serde_json::from_slice(&again).expect("a report reads back");
            assert_eq!(back, report);
        }
    }
});
