//! `modbus-mapper`: a Modbus TCP mapper speaking KubeEdge's DMI to edgecore. Parses the command
//! line, sets up logging and signals, and runs [`mapper_modbus::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use daemon::logging::LogFormat;
use mapper_modbus::{DEFAULT_NAME, DEFAULT_PROTOCOL, MapperConfig};
use tokio_util::sync::CancellationToken;

/// A Modbus TCP mapper for edgecore (KubeEdge's DMI v1beta1).
#[derive(Debug, Parser)]
#[command(name = "modbus-mapper", version)]
struct Cli {
    /// edgecore's DMI socket (DeviceManagerService).
    #[arg(long, default_value = dmi::DEFAULT_DMI_SOCKET)]
    dmi_socket: PathBuf,
    /// The Unix socket this mapper serves DeviceMapperService on.
    #[arg(long)]
    socket: PathBuf,
    /// The name the mapper registers under.
    #[arg(long, default_value = DEFAULT_NAME)]
    name: String,
    /// The protocol whose devices the mapper takes.
    #[arg(long, default_value = DEFAULT_PROTOCOL)]
    protocol: String,
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    daemon::logging::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the tokio runtime");
            return ExitCode::FAILURE;
        }
    };
    let config = MapperConfig {
        dmi_socket: cli.dmi_socket,
        socket: cli.socket,
        name: cli.name,
        protocol: cli.protocol,
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(daemon::signal::cancel_on_signal(shutdown.clone()));
        match mapper_modbus::run(config, shutdown).await {
            Ok(()) => {
                tracing::info!("modbus mapper stopped");
                ExitCode::SUCCESS
            }
            Err(error) => {
                tracing::error!(error = %daemon::error_chain(&error), "modbus mapper failed");
                ExitCode::FAILURE
            }
        }
    })
}
