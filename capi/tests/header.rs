//! The committed C header (`capi/include/wkvc.h`) is what cbindgen makes of the crate now: a
//! change to the ABI must update it (`WKVC_UPDATE_HEADER=1 cargo test -p wkvc-capi --test
//! header` writes it).

use std::path::Path;

#[test]
fn the_committed_header_is_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen reads the crate")
        .write(&mut out);
    let now = String::from_utf8(out).expect("utf-8");
    let path = dir.join("include/wkvc.h");
    if std::env::var_os("WKVC_UPDATE_HEADER").is_some() {
        std::fs::write(&path, &now).expect("write the header");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == now,
        "capi/include/wkvc.h is stale: run WKVC_UPDATE_HEADER=1 cargo test -p wkvc-capi --test \
         header and commit it"
    );
}
