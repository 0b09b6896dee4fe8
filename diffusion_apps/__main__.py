import sys

from diffusion_apps.cli import main

if __name__ == "__main__":
    sys.argv[0] = "python -m diffusion_apps"  # argparse's usage line names the program by it
    main()
