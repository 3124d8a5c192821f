#!/bin/bash

# Parameters
#SBATCH --account=lab
#SBATCH --constraint=a100
#SBATCH --cpus-per-task=8
#SBATCH --error=FOLDER/%j_0_log.err
#SBATCH --gpus-per-node=4
#SBATCH --job-name=temperature-2.0_seed-1
#SBATCH --mail-type=END
#SBATCH --mem=64G
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --open-mode=append
#SBATCH --output=FOLDER/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --qos=high
#SBATCH --signal=USR2@90
#SBATCH --time=1560
#SBATCH --wckey=submitit

# setup
module load cuda/12.4

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output FOLDER/%j_%t_log.out --error FOLDER/%j_%t_log.err PYTHON -u -m submitit.core._submit FOLDER
