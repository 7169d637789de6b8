//! The probe against the host's real PMI libraries (Slurm's libpmi2 and OpenPMIx, installed by
//! `ci/install-packages.sh`).

use cmpirun_pmi::probe::{probe_host, probe_paths};

#[test]
fn finds_slurm_libpmi2_and_openpmix() {
    let report = probe_host();
    let pmi2 = report
        .provider_of("PMI2_Init")
        .unwrap_or_else(|| panic!("no PMI2_Init provider: {report:#?}"));
    assert!(pmi2.name.starts_with("libpmi2.so"), "{pmi2:?}");
    let path = pmi2.path.as_ref().expect("loaded path");
    assert!(path.to_string_lossy().contains("libpmi2.so"), "{path:?}");

    let pmix = report
        .provider_of("PMIx_Init")
        .unwrap_or_else(|| panic!("no PMIx_Init provider: {report:#?}"));
    let version = pmix.pmix_version.as_deref().unwrap_or_default();
    assert!(version.contains("PMIx"), "{version:?}");
    assert_eq!(pmix.symbols.get("PMI2_Init"), Some(&false));

    // Serialisable for --dry-run and profiles.
    let json = serde_json::to_string(&report).unwrap();
    let back: cmpirun_pmi::probe::ProbeReport = serde_json::from_str(&json).unwrap();
    assert_eq!(back, report);
}

#[test]
fn probes_by_path() {
    let report = probe_paths(&[
        "/usr/lib/x86_64-linux-gnu/libpmi2.so.0",
        "/nonexistent/libpmi.so",
    ]);
    assert!(report.libraries[0].loaded, "{report:#?}");
    assert_eq!(report.libraries[0].symbols.get("PMI2_Init"), Some(&true));
    assert!(!report.libraries[1].loaded);
    assert!(
        report.libraries[1]
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("nonexistent")
    );
}
