"""What one RL step runs: rollout, scoring, experience (advantages, KL), the actor and critic
updates, weight sync, placement of the roles, and the PPO trainer loop that drives them."""
