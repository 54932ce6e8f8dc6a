"""The objective: what a response's score is and how its gradient is taken.

batch (the sequences to score), draws (keyed Monte Carlo timesteps and masks, VRPO), elbo (the
masked-diffusion bound of a response), blocks (a block model's rows), logprobs (the one forward of
every score), chunks (which rows go in which forward, how many calls each rank makes), scoring
(per-draw terms of pairs through an engine), losses and loss_config (the DPO family), chunk_loop (the
one forward and backward loop over chunks, in step on every rank), gradient (the exact chunked
preference gradient), sft (supervised fine-tuning on completions).
"""
