//! Fuzz target `defender_report`: Device Defender metrics reports (`defender::report`) as a
//! device agent publishes them on `$aws/things/<thing>/defender/metrics/{json|cbor}`.
//!
//! Input: the raw payload. Every input is parsed both as JSON and as CBOR (the seeds are the
//! agents' reports in `daemon/src/defender/testdata`, in both encodings).
//!
//! What must stay true (asserted here; see the module docs):
//! - parsing never panics and never allocates more than the input allows (libFuzzer's malloc
//!   limit turns a huge allocation into a crash);
//! - a report that is accepted round-trips: encoded in either format with either set of names,
//!   it parses back to the same report, with the names it was encoded with;
//! - `report_id_of` finds the accepted report's id in the same bytes (the `/rejected` reply's
//!   `reportId` and the accepted one agree);
//! - a refused report's error says what is wrong, and the `/rejected` reply built from it is
//!   JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wardgate::defender::report::{self, Format, Names, Report};

fn check(data: &[u8], format: Format) {
    match Report::parse(data, format) {
        Ok((report, names)) => {
            assert!(report.report_id > 0);
            assert_eq!(report.version, report::VERSION);
            assert!(report.metrics.is_some() || !report.custom_metrics.is_empty());
            assert_eq!(
                report::report_id_of(data, format),
                Some(report.report_id),
                "report_id_of disagrees with the parsed report"
            );
            for f in [Format::Json, Format::Cbor] {
                for n in [Names::Long, Names::Short] {
                    let bytes = report.encode(f, n);
                    match Report::parse(&bytes, f) {
                        Ok((again, again_names)) => {
                            assert_eq!(again, report, "{f:?}/{n:?} round trip changed the report");
                            assert_eq!(again_names, n);
                        }
                        Err(e) => panic!(
                            "{f:?}/{n:?} encoding of an accepted report ({names:?}) is refused: {e}\n{report:?}"
                        ),
                    }
                }
            }
            let accepted = report::accepted("thing", report.report_id, 0);
            assert!(serde_json::from_slice::<serde_json::Value>(&accepted).is_ok());
        }
        Err(why) => {
            assert!(!why.message.is_empty(), "an error without a message");
            let id = report::report_id_of(data, format);
            let reply = report::rejected("thing", id, &why, 0);
            assert!(serde_json::from_slice::<serde_json::Value>(&reply).is_ok());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data, Format::Json);
    check(data, Format::Cbor);
});
