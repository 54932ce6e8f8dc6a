"""The objective: what a response's score is and how its gradient is taken.

draws (keyed Monte Carlo timesteps and masks, VRPO), elbo (the masked-diffusion bound of a response),
blocks (a block model's rows), logprobs (the one forward of every score), scoring (per-draw terms of
pairs through an engine), losses and loss_config (the DPO family), gradient (the exact chunked
preference gradient), sft (supervised fine-tuning on completions).
"""
