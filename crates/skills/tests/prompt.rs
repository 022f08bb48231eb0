//! Progressive disclosure: the system prompt carries each skill's name and
//! description within a budget, never a body; bodies come from `skill.read`.

use std::path::Path;

use openpista_skills::discover;

fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

fn skills_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "word-count/SKILL.md",
        "---\nname: word-count\ndescription: Counts the words of a text.\nmode: subprocess\n\
         entry: run.sh\n---\n# Word count\n\nSECRET BODY: call with {\"text\": \"...\"}.\n",
    );
    write(
        dir.path(),
        "nested/deeper/weather/SKILL.md",
        "---\nname: weather\ndescription: |\n  Looks up the weather\n  for a city.\n---\n\
         SECRET BODY: needs network.\n",
    );
    write(
        dir.path(),
        "long/SKILL.md",
        &format!(
            "---\nname: long\ndescription: {}\n---\nSECRET BODY\n",
            "a very long description ".repeat(20)
        ),
    );
    write(dir.path(), "broken/SKILL.md", "no front matter at all\n");
    dir
}

#[test]
fn the_prompt_lists_names_and_descriptions_only() {
    let dir = skills_dir();
    let set = discover(&[dir.path().to_path_buf()]);
    let ctx = set.prompt_context(2_000);
    assert!(
        !ctx.contains("SECRET BODY"),
        "bodies stay out of the prompt"
    );
    insta::assert_snapshot!("prompt_full_budget", ctx);
}

#[test]
fn a_small_budget_lists_what_fits_and_counts_the_rest() {
    let dir = skills_dir();
    let set = discover(&[dir.path().to_path_buf()]);
    let ctx = set.prompt_context(200);
    assert!(ctx.len() <= 240, "{} chars", ctx.len());
    insta::assert_snapshot!("prompt_small_budget", ctx);
}
