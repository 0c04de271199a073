pub(crate) async fn run(_a: BenchArgs) -> anyhow::Result<()> {
    Ok(())
}
#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {}
