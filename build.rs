//! Records which libvirt this build compiles against, for `virtplan --version`.

fn main() {
    // virt-sys links libvirt through pkg-config too, so this is the version it builds against.
    let version = pkg_config::Config::new()
        .cargo_metadata(false)
        .env_metadata(false)
        .probe("libvirt")
        .map_or_else(|_| "unknown".to_owned(), |lib| lib.version);
    println!("cargo:rustc-env=VIRTPLAN_LIBVIRT_VERSION={version}");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    println!("cargo:rerun-if-changed=build.rs");
}
