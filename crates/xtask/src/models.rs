//! The site's model list with each file's content hash: the page keys its model
//! cache by it (web/index.js), so a site rebuilt with a new model file under the
//! same name never serves the old one from the Cache API.

use std::path::Path;

use sha2::{Digest, Sha256};

/// Adds `"sha256"` to every entry of `site/models/models.json`, from the file it names.
pub fn write_hashes(site: &Path) -> Result<(), String> {
    let list_path = site.join("models").join("models.json");
    let text = std::fs::read_to_string(&list_path).map_err(|e| format!("{}: {e}", list_path.display()))?;
    let mut list: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", list_path.display()))?;
    let entries = list
        .get_mut("models")
        .and_then(|models| models.as_array_mut())
        .ok_or_else(|| format!("{}: expected {{\"models\": [...]}}", list_path.display()))?;
    for entry in entries {
        let file = entry
            .get("file")
            .and_then(|file| file.as_str())
            .ok_or_else(|| format!("{}: an entry has no \"file\"", list_path.display()))?;
        let model_path = site.join("models").join(file);
        let bytes = std::fs::read(&model_path).map_err(|e| format!("{}: {e}", model_path.display()))?;
        let hash: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        entry["sha256"] = serde_json::Value::String(hash);
    }
    let mut out = serde_json::to_string_pretty(&list).map_err(|e| e.to_string())?;
    out.push('\n');
    std::fs::write(&list_path, out).map_err(|e| format!("{}: {e}", list_path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_gets_the_sha256_of_its_file_and_a_missing_file_is_an_error() {
        let site = std::env::temp_dir().join(format!("xtask-models-{}", std::process::id()));
        std::fs::create_dir_all(site.join("models")).unwrap();
        std::fs::write(site.join("models").join("a.safetensors"), b"abc").unwrap();
        std::fs::write(
            site.join("models").join("models.json"),
            r#"{"models": [{"file": "a.safetensors", "name": "A"}]}"#,
        )
        .unwrap();
        write_hashes(&site).unwrap();
        let list: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(site.join("models").join("models.json")).unwrap()).unwrap();
        assert_eq!(
            list["models"][0]["sha256"],
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(list["models"][0]["name"], "A");

        std::fs::remove_file(site.join("models").join("a.safetensors")).unwrap();
        let error = write_hashes(&site).unwrap_err();
        assert!(error.contains("a.safetensors"), "{error}");
        std::fs::remove_dir_all(&site).unwrap();
    }
}
