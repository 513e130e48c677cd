"""The installed app's one executable: the GUI, or (with --worker) the job worker process that the
GUI starts for every job (core.jobs.client.worker_command), or --self-test / --info / --version."""
import multiprocessing
import sys

if __name__ == "__main__":
    multiprocessing.freeze_support()
    from gui.app import main
    sys.exit(main())
