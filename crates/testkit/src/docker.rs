//! The Docker daemon the tests use and the local test image.
//!
//! `scripts/test.sh` starts its own `dockerd` on a unix socket under
//! `/run/openpista-test` and exports `OPENPISTA_TEST_DOCKER_HOST`. Tests that
//! need Docker call [`docker_host`] (which panics with a how-to when the
//! daemon is missing: such tests never pass silently) and
//! [`ensure_test_image`], which imports [`TEST_IMAGE`] from a busybox-static
//! root filesystem when the daemon does not have it yet (no registry needed).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::{CreateImageOptions, ListContainersOptions};
use futures::StreamExt;

/// The image imported for tests.
pub const TEST_IMAGE: &str = "openpista-sandbox:test";
/// Label on every container a test makes (`openpista.test=1`).
pub const TEST_LABEL: &str = "openpista.test";
/// The socket `scripts/test.sh` starts dockerd on.
pub const HARNESS_SOCKET: &str = "/run/openpista-test/docker.sock";
/// The busybox-static binary copied into the test image.
pub const BUSYBOX: &str = "/bin/busybox";

/// The test daemon's address: `$OPENPISTA_TEST_DOCKER_HOST`, else the
/// harness socket if it exists. Panics with how to start one otherwise.
pub fn docker_host() -> String {
    if let Some(h) = std::env::var_os("OPENPISTA_TEST_DOCKER_HOST") {
        return h.to_string_lossy().into_owned();
    }
    if Path::new(HARNESS_SOCKET).exists() {
        return format!("unix://{HARNESS_SOCKET}");
    }
    panic!("{}", how_to(&format!("no socket at {HARNESS_SOCKET}")));
}

fn how_to(why: &str) -> String {
    format!(
        "the Docker tests need a running dockerd ({why}): run `bash scripts/test.sh` (it \
         installs docker.io + busybox-static and starts one), or start dockerd yourself: \
         `mkdir -p /run/openpista-test && dockerd --host unix://{HARNESS_SOCKET} --data-root \
         /tmp/opd/data --exec-root /tmp/opd/exec --pidfile /tmp/opd/pid &` and set \
         OPENPISTA_TEST_DOCKER_HOST=unix://{HARNESS_SOCKET}"
    )
}

/// A client for [`docker_host`] that answered a ping. Panics with a how-to
/// when the daemon does not answer.
pub async fn docker() -> Docker {
    let host = docker_host();
    let path = host.strip_prefix("unix://").unwrap_or(&host);
    let client = Docker::connect_with_unix(
        path,
        120,
        &bollard::ClientVersion {
            major_version: 1,
            minor_version: 41,
        },
    )
    .unwrap_or_else(|e| panic!("{}", how_to(&format!("{host}: {e}"))));
    if let Err(e) = client.ping().await {
        panic!("{}", how_to(&format!("{host} does not answer: {e}")));
    }
    client
}

/// Imports [`TEST_IMAGE`] from a busybox-static rootfs unless present.
pub async fn ensure_test_image(docker: &Docker) {
    if docker.inspect_image(TEST_IMAGE).await.is_ok() {
        return;
    }
    let tar = busybox_rootfs_tar();
    let (repo, tag) = TEST_IMAGE.split_once(':').unwrap_or((TEST_IMAGE, "latest"));
    let mut stream = docker.create_image(
        Some(CreateImageOptions {
            from_src: Some("-".to_owned()),
            repo: Some(repo.to_owned()),
            tag: Some(tag.to_owned()),
            ..Default::default()
        }),
        Some(bollard::body_full(tar.into())),
        None,
    );
    while let Some(item) = stream.next().await {
        if let Err(e) = item {
            panic!("importing {TEST_IMAGE} failed: {e}");
        }
    }
    assert!(
        docker.inspect_image(TEST_IMAGE).await.is_ok(),
        "{TEST_IMAGE} is still missing after the import"
    );
}

/// A tar of a minimal root filesystem: `/bin/busybox` plus one symlink per
/// applet, and empty `/tmp`, `/workspace`, `/skill`, `/run/secrets`, `/proc`,
/// `/sys`, `/dev`, `/etc`.
pub fn busybox_rootfs_tar() -> Vec<u8> {
    assert!(
        Path::new(BUSYBOX).is_file(),
        "{BUSYBOX} is missing: `apt-get install busybox-static` (scripts/test.sh does)"
    );
    let list = std::process::Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .unwrap_or_else(|e| panic!("{BUSYBOX} --list: {e}"));
    let applets = String::from_utf8_lossy(&list.stdout).into_owned();
    let mut b = tar::Builder::new(Vec::new());
    for dir in [
        "bin",
        "tmp",
        "workspace",
        "skill",
        "run",
        "run/secrets",
        "proc",
        "sys",
        "dev",
        "etc",
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(if dir == "tmp" { 0o1777 } else { 0o755 });
        h.set_size(0);
        b.append_data(&mut h, format!("{dir}/"), std::io::empty())
            .unwrap();
    }
    let bytes = std::fs::read(BUSYBOX).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(bytes.len() as u64);
    b.append_data(&mut h, "bin/busybox", bytes.as_slice())
        .unwrap();
    for applet in applets.lines().map(str::trim) {
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .unwrap();
    }
    b.into_inner().unwrap()
}

/// Ids of containers (any state) that carry `label` (`key` or `key=value`).
pub async fn containers_with_label(docker: &Docker, label: &str) -> Vec<String> {
    let filters = HashMap::from([("label".to_owned(), vec![label.to_owned()])]);
    docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .unwrap_or_else(|e| panic!("listing containers: {e}"))
        .into_iter()
        .filter_map(|c| c.id)
        .collect()
}

/// Waits (up to 30 s, polling) until no container carries `label`; panics
/// naming the ones left.
pub async fn assert_no_container_left(docker: &Docker, label: &str) {
    let mut left = Vec::new();
    for _ in 0..150 {
        left = containers_with_label(docker, label).await;
        if left.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("containers labelled {label} remain: {left:?}");
}
