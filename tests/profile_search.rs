//! How the profile is chosen, through the real binary: `--profile` over `$CMPIRUN_PROFILE` over
//! match rules; earlier search directories shadow later ones; the highest weight wins.

use std::path::Path;
use std::process::{Command, Output};

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cmpirun"));
    c.args(args)
        .env_remove("CMPIRUN_PROFILE")
        .env_remove("CMPIRUN_PROFILE_DIRS")
        .env_remove("SLURM_JOB_ID")
        .env_remove("SLURM_MPI_TYPE");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run cmpirun")
}

/// `profile show --json` → (name, file, selected_by).
fn chosen(args: &[&str], env: &[(&str, &str)]) -> (String, String, String) {
    let mut all = vec!["profile", "show", "--json"];
    all.extend_from_slice(args);
    let out = run(&all, env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        v["profile"]["name"].as_str().unwrap().to_owned(),
        v["profile"]["file"].as_str().unwrap().to_owned(),
        v["selected_by"].as_str().unwrap().to_owned(),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn flag_beats_env_beats_match_and_earlier_dirs_shadow_later() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    let a_same = write(&a, "same.yaml", "name: same\ndescription: from a\n");
    write(&b, "same.yaml", "name: same\ndescription: from b\n");
    let b_other = write(&b, "other.yaml", "name: other\n");
    let b_auto = write(&b, "auto.yaml", "name: auto\nmatch: {}\n");
    let dirs = format!("{}:{}", a.display(), b.display());
    let env = [("CMPIRUN_PROFILE_DIRS", dirs.as_str())];

    assert_eq!(
        chosen(&["--profile", "same"], &env),
        ("same".into(), a_same.clone(), "flag".into())
    );
    assert_eq!(chosen(&[], &env), ("auto".into(), b_auto, "match".into()));
    let env2 = [
        ("CMPIRUN_PROFILE_DIRS", dirs.as_str()),
        ("CMPIRUN_PROFILE", "other"),
    ];
    assert_eq!(
        chosen(&[], &env2),
        ("other".into(), b_other, "env-var".into())
    );
    assert_eq!(chosen(&["--profile", "same"], &env2).2, "flag");
    // A path works from anywhere, outside the search path too.
    let elsewhere = write(&t.path().join("c"), "mine.yml", "name: mine\n");
    assert_eq!(chosen(&["--profile", &elsewhere], &env).0, "mine");
    // An extends chain resolves through the search path, shadowing included.
    let child = write(
        &t.path().join("c"),
        "child.yaml",
        "name: child\nextends: same\n",
    );
    let out = run(&["profile", "show", "--json", "--profile", &child], &env);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["profile"]["chain"], serde_json::json!([a_same, child]));
}

#[test]
fn default_search_path_puts_the_user_config_before_the_shipped_profiles() {
    let t = tempfile::tempdir().unwrap();
    let user = t.path().join("cmpirun/profiles.d");
    let mine = write(
        &user,
        "generic.yaml",
        "name: generic\ndescription: mine\nmatch: {weight: 0}\n",
    );
    let env = [("XDG_CONFIG_HOME", t.path().to_str().unwrap())];
    let (name, file, by) = chosen(&[], &env);
    assert_eq!(
        (name.as_str(), file.as_str(), by.as_str()),
        ("generic", mine.as_str(), "match")
    );
    // Without it, the shipped generic profile is chosen (found next to the source tree).
    let empty = tempfile::tempdir().unwrap();
    let env = [("XDG_CONFIG_HOME", empty.path().to_str().unwrap())];
    let (name, file, _) = chosen(&[], &env);
    assert_eq!(name, "generic");
    assert!(file.ends_with("profiles/generic.yaml"), "{file}");
    // The shipped ones are found by name.
    assert_eq!(
        chosen(&["--profile", "hpe-slingshot"], &env).0,
        "hpe-slingshot"
    );
}

#[test]
fn highest_weight_wins() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    write(
        d,
        "any.yaml",
        "name: any\nmatch:\n  env:\n    SITE: \"*\"\n  weight: 10\n",
    );
    write(
        d,
        "bar.yaml",
        "name: bar\nmatch:\n  env:\n    SITE: \"bar*\"\n  weight: 20\n",
    );
    write(
        d,
        "unset.yaml",
        "name: unset\nmatch:\n  env:\n    SITE: null\n",
    );
    let dirs = d.to_str().unwrap();
    assert_eq!(
        chosen(&[], &[("CMPIRUN_PROFILE_DIRS", dirs), ("SITE", "bar7")]).0,
        "bar"
    );
    assert_eq!(
        chosen(&[], &[("CMPIRUN_PROFILE_DIRS", dirs), ("SITE", "foo")]).0,
        "any"
    );
    assert_eq!(chosen(&[], &[("CMPIRUN_PROFILE_DIRS", dirs)]).0, "unset");
}

#[test]
fn default_weight_is_the_number_of_conditions() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let marker = write(d, "marker", "");
    write(d, "one.yaml", "name: one\nmatch:\n  hostnames: [\"*\"]\n");
    write(
        d,
        "two.yaml",
        &format!("name: two\nmatch:\n  hostnames: [\"*\"]\n  files: [\"{marker}\"]\n"),
    );
    let dirs = d.to_str().unwrap();
    let out = run(&["profile", "show"], &[("CMPIRUN_PROFILE_DIRS", dirs)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("profile: two\n"), "{text}");
    assert!(text.contains("weight 2, above one (weight 1)"), "{text}");
    assert!(text.contains(&format!("{marker} exists")), "{text}");
    // Without the file, `two` does not match and `one` is chosen.
    std::fs::remove_file(&marker).unwrap();
    assert_eq!(chosen(&[], &[("CMPIRUN_PROFILE_DIRS", dirs)]).0, "one");
}
